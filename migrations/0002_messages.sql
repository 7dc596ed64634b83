-- The message log: one row per message a journey decided to send, keyed by its idempotency key.
CREATE TABLE messages (
    id                  bigserial PRIMARY KEY,
    -- Workflow id, entry and step: the same key is never sent twice.
    idempotency_key     text NOT NULL UNIQUE,
    customer_id         text NOT NULL,
    journey             text NOT NULL,
    workflow_id         text NOT NULL,
    step                text NOT NULL,
    template            text NOT NULL,
    locale              text,
    channel             text NOT NULL DEFAULT 'email',
    transactional       boolean NOT NULL DEFAULT false,
    -- claimed: recorded, nothing handed to the provider yet, safe to try again.
    -- sending: the provider may have the message; never tried again.
    -- sent / skipped / suppressed / failed: final.
    -- unknown: the provider's answer was lost after it may have accepted the message.
    status              text NOT NULL CHECK (
        status IN ('claimed', 'sending', 'sent', 'skipped', 'suppressed', 'failed', 'unknown')
    ),
    reason              text,
    recipient           text,
    subject             text,
    provider_message_id text,
    provider_response   text,
    attempts            integer NOT NULL DEFAULT 0,
    -- The journey's own clock when the step ran; equals wall time outside time-skipping tests.
    step_at             timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz
);

CREATE INDEX messages_customer_idx ON messages (customer_id, journey, step_at);
CREATE INDEX messages_status_idx ON messages (status, template);
