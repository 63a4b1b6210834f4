-- The tables of the original design (control_plane.webhooks, webhook_deliveries), plus
-- the stored events and one row per delivery attempt (CONTRACT §2).

CREATE SCHEMA IF NOT EXISTS control_plane;

CREATE TABLE control_plane.webhooks (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id           text        NOT NULL,
    event_type           text        NOT NULL,
    url                  text        NOT NULL,
    http_method          text        NOT NULL DEFAULT 'POST',
    headers              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    secret               text,
    disabled             boolean     NOT NULL DEFAULT false,
    disabled_at          timestamptz,
    disabled_reason      text,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    failing_since        timestamptz,
    last_delivery_at     timestamptz,
    last_failure_at      timestamptz,
    -- When `disabled` last changed: an attempt that started before it leaves the
    -- counter and the disabled state alone (CONTRACT §3). Maintained by a trigger.
    disabled_changed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhooks_url_not_empty CHECK (url <> ''),
    CONSTRAINT webhooks_project_id_not_empty CHECK (project_id <> ''),
    CONSTRAINT webhooks_event_type_not_empty CHECK (event_type <> ''),
    CONSTRAINT webhooks_consecutive_failures_not_negative CHECK (consecutive_failures >= 0)
);

CREATE INDEX webhooks_project_id_idx ON control_plane.webhooks (project_id);
CREATE INDEX webhooks_event_type_idx ON control_plane.webhooks (event_type);
CREATE INDEX webhooks_disabled_idx ON control_plane.webhooks (disabled);
CREATE INDEX webhooks_project_event_idx ON control_plane.webhooks (project_id, event_type);
CREATE INDEX webhooks_consecutive_failures_idx ON control_plane.webhooks (consecutive_failures);

-- Re-enabling a webhook (disabled = false) starts it afresh: counter 0, no failure run.
-- Disabling it, whether the worker does it or an operator with plain SQL, stops its
-- waiting deliveries (`pending` and `failed`) in the same transaction, so their retry
-- messages are dropped without a request (CONTRACT §3).
CREATE FUNCTION control_plane.webhooks_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.disabled IS DISTINCT FROM OLD.disabled THEN
        NEW.disabled_changed_at := clock_timestamp();
        IF NOT NEW.disabled THEN
            NEW.consecutive_failures := 0;
            NEW.failing_since := NULL;
            NEW.disabled_at := NULL;
            NEW.disabled_reason := NULL;
        ELSE
            IF NEW.disabled_at IS NULL THEN
                NEW.disabled_at := now();
            END IF;
            UPDATE control_plane.webhook_deliveries
               SET status = 'disabled', next_retry_at = NULL, error_type = 'WEBHOOK_DISABLED',
                   error_message = 'webhook disabled: '
                       || coalesce(NEW.disabled_reason, 'by an operator'),
                   updated_at = now()
             WHERE webhook_id = NEW.id AND status IN ('pending', 'failed');
        END IF;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER webhooks_before_update BEFORE UPDATE ON control_plane.webhooks
    FOR EACH ROW EXECUTE FUNCTION control_plane.webhooks_before_update();

-- Each event once: deduplication by id, and what any retry or replay is built from.
CREATE TABLE control_plane.events (
    id          uuid PRIMARY KEY,
    project_id  text        NOT NULL,
    event_type  text        NOT NULL,
    data        json        NOT NULL, -- json, not jsonb: receivers get the producer's exact text
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    traceparent text,
    tracestate  text
);

CREATE INDEX events_received_at_idx ON control_plane.events (received_at);

CREATE TABLE control_plane.webhook_deliveries (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    webhook_id       uuid        NOT NULL REFERENCES control_plane.webhooks (id) ON DELETE CASCADE,
    event_id         uuid        NOT NULL REFERENCES control_plane.events (id) ON DELETE CASCADE,
    project_id       text        NOT NULL,
    event_type       text        NOT NULL,
    status           text        NOT NULL DEFAULT 'pending',
    http_status_code integer,
    response_body    text,
    error_message    text,
    error_type       text,
    attempts         integer     NOT NULL DEFAULT 0,
    next_retry_at    timestamptz,
    duration_ms      integer,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_deliveries_webhook_event_unique UNIQUE (webhook_id, event_id),
    CONSTRAINT webhook_deliveries_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT webhook_deliveries_status_valid CHECK (status IN
        ('pending', 'delivering', 'delivered', 'failed', 'permanently_failed', 'disabled')),
    CONSTRAINT webhook_deliveries_error_type_valid CHECK (error_type IN
        ('INVALID_URL', 'BLOCKED_DESTINATION', 'URL_NOT_REACHABLE', 'REQUEST_TIMEOUT',
         'TLS_ERROR', 'HTTP_ERROR', 'INVALID_WEBHOOK', 'WEBHOOK_DISABLED'))
);

CREATE INDEX webhook_deliveries_webhook_id_idx ON control_plane.webhook_deliveries (webhook_id);
CREATE INDEX webhook_deliveries_event_id_idx ON control_plane.webhook_deliveries (event_id);
CREATE INDEX webhook_deliveries_status_idx ON control_plane.webhook_deliveries (status);
CREATE INDEX webhook_deliveries_created_at_idx ON control_plane.webhook_deliveries (created_at);
CREATE INDEX webhook_deliveries_webhook_status_idx ON control_plane.webhook_deliveries (webhook_id, status);

CREATE TABLE control_plane.webhook_delivery_attempts (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    delivery_id      uuid        NOT NULL REFERENCES control_plane.webhook_deliveries (id) ON DELETE CASCADE,
    webhook_id       uuid        NOT NULL,
    attempt_number   integer     NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      integer     NOT NULL,
    http_status_code integer,
    response_body    text,
    error_type       text,
    error_message    text,
    succeeded        boolean     NOT NULL,
    CONSTRAINT webhook_delivery_attempts_number_unique UNIQUE (delivery_id, attempt_number),
    CONSTRAINT webhook_delivery_attempts_number_positive CHECK (attempt_number >= 1)
);

CREATE INDEX webhook_delivery_attempts_webhook_id_idx
    ON control_plane.webhook_delivery_attempts (webhook_id, started_at);
