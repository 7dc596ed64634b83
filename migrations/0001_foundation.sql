-- Customers, their identities, stored events, the outbox that routes events into journeys,
-- and the log of journey runs.

CREATE TABLE customers (
    id               text PRIMARY KEY,
    user_id          text UNIQUE,
    email            text,
    traits           jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Per trait, the timestamp of the event that last set it: traits merge by event time.
    trait_timestamps jsonb NOT NULL DEFAULT '{}'::jsonb,
    first_seen_at    timestamptz NOT NULL,
    last_seen_at     timestamptz NOT NULL,
    merged_into      text REFERENCES customers (id),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX customers_email_idx ON customers (email);

-- Every known identifier of a person points at exactly one canonical customer.
CREATE TABLE identities (
    kind        text NOT NULL CHECK (kind IN ('user_id', 'anonymous_id', 'email')),
    value       text NOT NULL,
    customer_id text NOT NULL REFERENCES customers (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, value)
);

CREATE INDEX identities_customer_idx ON identities (customer_id);

CREATE TABLE events (
    id                 bigserial PRIMARY KEY,
    -- Fingerprint of the write key the event arrived with; message ids are unique per source.
    source             text NOT NULL,
    message_id         text NOT NULL,
    type               text NOT NULL,
    name               text,
    customer_id        text NOT NULL REFERENCES customers (id),
    user_id            text,
    anonymous_id       text,
    timestamp          timestamptz NOT NULL,
    original_timestamp timestamptz,
    sent_at            timestamptz,
    received_at        timestamptz NOT NULL,
    properties         jsonb,
    traits             jsonb,
    context            jsonb,
    payload            jsonb NOT NULL,
    UNIQUE (source, message_id)
);

CREATE INDEX events_customer_time_idx ON events (customer_id, timestamp);

-- Events that some journey wants and that have not reached Temporal yet. A row is written in the
-- same transaction as its event and deleted once every matching journey has the event.
CREATE TABLE outbox (
    event_id        bigint PRIMARY KEY REFERENCES events (id),
    customer_id     text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    -- Journeys that already have the event, so a retry after a partial failure skips them.
    delivered_to    text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX outbox_due_idx ON outbox (next_attempt_at, event_id);
CREATE INDEX outbox_customer_idx ON outbox (customer_id, event_id);

CREATE TABLE journey_runs (
    id          bigserial PRIMARY KEY,
    journey     text NOT NULL,
    customer_id text NOT NULL,
    workflow_id text NOT NULL,
    run_id      text,
    status      text NOT NULL CHECK (status IN ('active', 'completed', 'exited')),
    reason      text,
    entered_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz
);

-- At most one open run per journey and customer, as Temporal allows one open workflow per id.
CREATE UNIQUE INDEX journey_runs_active_idx ON journey_runs (journey, customer_id) WHERE status = 'active';
CREATE INDEX journey_runs_customer_idx ON journey_runs (customer_id, journey, entered_at);
