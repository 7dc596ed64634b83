-- The contact policy: consent per channel and topic, and each message's policy decision.

ALTER TABLE messages DROP CONSTRAINT messages_status_check;
ALTER TABLE messages ADD CONSTRAINT messages_status_check CHECK (
    status IN (
        'claimed', 'reserved', 'sending', 'sent', 'deferred',
        'skipped', 'suppressed', 'dropped', 'failed', 'unknown'
    )
);

ALTER TABLE messages
    ADD COLUMN priority integer NOT NULL DEFAULT 5,
    ADD COLUMN topic text,
    ADD COLUMN droppable boolean NOT NULL DEFAULT false,
    ADD COLUMN deadline timestamptz,
    -- When a deferred message may go, as the policy decided; it holds that slot meanwhile.
    ADD COLUMN deferred_until timestamptz,
    -- The policy's latest decision in words: "deferred until ... by email:1/16h".
    ADD COLUMN decision text;

CREATE TABLE consents (
    id          bigserial PRIMARY KEY,
    customer_id text NOT NULL REFERENCES customers (id),
    channel     text NOT NULL CHECK (channel IN ('email', 'whatsapp', 'sms')),
    -- NULL covers every topic of the channel; a row for a topic overrides it for that topic.
    topic       text,
    granted     boolean NOT NULL,
    source      text NOT NULL,
    recorded_at timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX consents_lookup_idx ON consents (customer_id, channel, recorded_at DESC);
