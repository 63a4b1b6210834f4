-- Operational events (issue #6): the attempt that disabled its webhook says so, with the
-- time of that transaction (equal to the webhook's `disabled_at` it set). It is what lets
-- a redelivered message tell, after a crash between committing the attempt and publishing
-- `webhook.disabled`, that its attempt disabled the webhook (an operator's disable sets
-- no attempt's column), and it never changes afterwards, so the event published again is
-- the same. Null for every other attempt; nothing is rewritten.
ALTER TABLE control_plane.webhook_delivery_attempts
    ADD COLUMN disabled_webhook_at timestamptz;
