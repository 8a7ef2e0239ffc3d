-- migrate:up

-- The span context (W3C traceparent) of the request that accepted an intent, written in the same
-- transaction, and of the request that last replayed it; the worker's span for the intent links to
-- both. NULL when tracing is off. Nullable and unread by the release before: a rolling upgrade.
ALTER TABLE intents ADD COLUMN traceparent text, ADD COLUMN replay_traceparent text;

-- migrate:down

ALTER TABLE intents DROP COLUMN traceparent, DROP COLUMN replay_traceparent;
