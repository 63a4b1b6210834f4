-- Disabling a webhook, whether the worker does it or an operator with plain SQL, stops its
-- waiting deliveries (`pending` and `failed`) in the same transaction, so their retry
-- messages are dropped without a request (CONTRACT §3).

CREATE OR REPLACE FUNCTION control_plane.webhooks_before_update() RETURNS trigger
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
