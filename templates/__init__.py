"""Message templates: `email/<name>.<locale>.yaml`, rendered by activities.templates."""
