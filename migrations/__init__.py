"""SQL migrations, applied in file-name order by `bisik migrate`."""
