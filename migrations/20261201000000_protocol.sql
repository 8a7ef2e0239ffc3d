-- migrate:up

-- The key an intent uploads to lives on the intent row, which the claim locks: a claim must never
-- read it from a snapshot older than the lock (a replay may have just given the version a fresh
-- key). Publishing checks that the version still names the key that was uploaded.
ALTER TABLE intents ADD COLUMN blob_key text;
UPDATE intents i SET blob_key = v.blob_key
FROM versions v
WHERE v.user_id = i.user_id AND v.version = i.version;
ALTER TABLE intents ALTER COLUMN blob_key SET NOT NULL;

-- The grace period of a deletion counts from when a collector first saw the row (stamped by the
-- collector with the database clock), never from inside the transaction that scheduled it: that
-- transaction may take long to commit, and readers are promised the whole grace period.
ALTER TABLE blob_deletions ADD COLUMN seen_at timestamptz;
-- Rows scheduled before this migration are first seen by the next collection round, like new ones.
DROP INDEX blob_deletions_scheduled;
CREATE INDEX blob_deletions_scheduled ON blob_deletions (seen_at) WHERE state = 'scheduled';
ALTER TABLE blob_deletions ALTER COLUMN scheduled_at SET DEFAULT now();

-- `deleted` now says what readers see: the live version is a tombstone. It is the one definition
-- of "the profile exists" (a put is live) used by reads and by every precondition.
UPDATE profiles p SET deleted = (v.kind = 'delete')
FROM versions v
WHERE v.user_id = p.user_id AND v.version = p.live_version;
UPDATE profiles SET deleted = false WHERE live_version IS NULL;
COMMENT ON COLUMN profiles.deleted IS 'the live version is a tombstone';

-- migrate:down

COMMENT ON COLUMN profiles.deleted IS NULL;
ALTER TABLE blob_deletions ALTER COLUMN scheduled_at SET DEFAULT clock_timestamp();
DROP INDEX blob_deletions_scheduled;
CREATE INDEX blob_deletions_scheduled ON blob_deletions (scheduled_at) WHERE state = 'scheduled';
ALTER TABLE blob_deletions DROP COLUMN seen_at;
ALTER TABLE intents DROP COLUMN blob_key;
