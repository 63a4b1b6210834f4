-- Operator commands (issue #6): rotating a webhook's secret with a grace period, and
-- replaying a delivery with a fresh retry schedule. Columns only; nothing is rewritten.

-- While `previous_secret_expires_at` is in the future, requests are signed with both the
-- current and the previous secret (`webhook-signature: v1,<new> v1,<old>`), as Standard
-- Webhooks allows, so receivers can switch secrets without rejecting a request.
ALTER TABLE control_plane.webhooks
    ADD COLUMN previous_secret            text,
    ADD COLUMN previous_secret_expires_at timestamptz;

-- The number of attempts a delivery had when it was last replayed: attempt numbers go on
-- from there, and the retry schedule counts again from its first delay.
ALTER TABLE control_plane.webhook_deliveries
    ADD COLUMN attempts_before_replay integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT webhook_deliveries_attempts_before_replay_valid
        CHECK (attempts_before_replay >= 0 AND attempts_before_replay <= attempts);
