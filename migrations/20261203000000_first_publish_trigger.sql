-- migrate:up

-- A profile's first publish replaces nothing: the trigger is not called for it. Calling it there
-- cost more than the call: with OLD.live_version NULL, each of its statements plans to nothing,
-- which kept PostgreSQL's average custom plan cheaper than the generic one, so every later call
-- was planned again too (96 % of calls in a drain, 15 % of the publish's server time).
DROP TRIGGER retire_replaced_blob ON profiles;
CREATE TRIGGER retire_replaced_blob
AFTER UPDATE OF live_version ON profiles
FOR EACH ROW WHEN (OLD.live_version IS NOT NULL AND OLD.live_version IS DISTINCT FROM NEW.live_version)
EXECUTE FUNCTION retire_replaced_blob();

-- migrate:down

DROP TRIGGER retire_replaced_blob ON profiles;
CREATE TRIGGER retire_replaced_blob
AFTER UPDATE OF live_version ON profiles
FOR EACH ROW WHEN (OLD.live_version IS DISTINCT FROM NEW.live_version)
EXECUTE FUNCTION retire_replaced_blob();
