-- migrate:up

-- An Idempotency-Key keeps what its write was accepted as (intent id, version, state); the API
-- renders the answer from that, so the stored record holds no HTTP.
ALTER TABLE idempotency_keys DROP COLUMN response_status;
ALTER TABLE idempotency_keys RENAME COLUMN response_body TO accepted;

-- The one definition of "a blob is still needed": a version names it that is pending (its upload
-- may be under way, and it may still be published) or live. The collector and reconciliation ask it.
CREATE FUNCTION blob_is_needed(key text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1
        FROM versions v JOIN profiles p ON p.user_id = v.user_id
        WHERE v.blob_key = key AND (v.state = 'pending' OR p.live_version = v.version)
    )
$$;

-- The one place a blob is retired: when the version naming it stops being pending or live, its key
-- is scheduled for deletion (collected once the grace period has passed), by the statement that
-- made the change, whichever it is (publish, delete, a claim or a failure that kills an intent).

-- A version that failed or was superseded never goes live; an upload it may have made is not needed.
CREATE FUNCTION retire_unpublished_blob() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO blob_deletions (blob_key, user_id, version, reason)
    VALUES (NEW.blob_key, NEW.user_id, NEW.version, NEW.state)
    ON CONFLICT (blob_key) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER retire_unpublished_blob
AFTER UPDATE OF state ON versions
FOR EACH ROW WHEN (NEW.state IN ('failed', 'superseded') AND OLD.state IS DISTINCT FROM NEW.state)
EXECUTE FUNCTION retire_unpublished_blob();

-- The put that was live, once a newer put or a tombstone replaces it. Its key is read as committed
-- now, not as of the statement's snapshot (a replay may have published that version under a fresh
-- key meanwhile): a trigger's query takes a snapshot of its own, and the share lock makes it wait
-- for a writer of that row that has not committed yet.
CREATE FUNCTION retire_replaced_blob() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO blob_deletions (blob_key, user_id, version, reason)
    SELECT v.blob_key, v.user_id, v.version, CASE WHEN NEW.deleted THEN 'deleted' ELSE 'replaced' END
    FROM versions v
    WHERE v.user_id = OLD.user_id AND v.version = OLD.live_version AND v.kind = 'put'
    FOR SHARE OF v
    ON CONFLICT (blob_key) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER retire_replaced_blob
AFTER UPDATE OF live_version ON profiles
FOR EACH ROW WHEN (OLD.live_version IS DISTINCT FROM NEW.live_version)
EXECUTE FUNCTION retire_replaced_blob();

-- migrate:down

DROP TRIGGER retire_replaced_blob ON profiles;
DROP FUNCTION retire_replaced_blob();
DROP TRIGGER retire_unpublished_blob ON versions;
DROP FUNCTION retire_unpublished_blob();
DROP FUNCTION blob_is_needed(text);
-- The release before answers a replayed key with the stored body as it was sent: rebuild it.
UPDATE idempotency_keys
SET accepted = accepted || jsonb_build_object('user_id', user_id, 'status_url', '/v1/intents/' || (accepted ->> 'intent_id'));
ALTER TABLE idempotency_keys RENAME COLUMN accepted TO response_body;
ALTER TABLE idempotency_keys ADD COLUMN response_status integer NOT NULL DEFAULT 202;
