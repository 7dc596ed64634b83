-- Suppressions, the product catalog, values derived at ingest, and outbound webhooks.

-- Who must not receive marketing on a channel, and why. Transactional messages ignore it.
CREATE TABLE suppressions (
    id          bigserial PRIMARY KEY,
    customer_id text NOT NULL REFERENCES customers (id),
    -- 'email', 'whatsapp', 'sms', or 'all' for every channel.
    channel     text NOT NULL,
    -- NULL suppresses every topic of the channel.
    topic       text,
    reason      text NOT NULL CHECK (reason IN ('unsubscribed', 'hard_bounce', 'complaint', 'sunset')),
    source      text NOT NULL,
    message_id  bigint,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX suppressions_unique_idx
    ON suppressions (customer_id, channel, COALESCE(topic, ''), reason);

-- Products shoppers can be shown: imported with `bisik catalog import`, kept current by the
-- properties of `Product Viewed` and `Product Added` events.
CREATE TABLE products (
    product_id  text PRIMARY KEY,
    name        text NOT NULL,
    brand       text,
    category    text,
    price       numeric(14, 2),
    currency    text,
    image_url   text,
    product_url text,
    -- NULL when no import has said how many are in stock.
    stock       integer,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX products_category_idx ON products (category);

-- Facts computed at ingest that journeys route on, kept apart from what the client sent.
ALTER TABLE events ADD COLUMN derived jsonb NOT NULL DEFAULT '{}'::jsonb;

CREATE INDEX events_customer_name_time_idx ON events (customer_id, name, timestamp);

-- Journey events waiting to be posted to the configured webhook, retried with backoff.
CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    event_type      text NOT NULL,
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);

CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
