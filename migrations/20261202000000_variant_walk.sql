-- migrate:up

-- Why an intent exists: to publish its version (the one a PUT accepted), or to add to a live
-- version the variants the configuration gained (or changed) after the version was published. A
-- version has exactly one publish intent and at most one unfinished add_variants intent.
ALTER TABLE intents ADD COLUMN purpose text NOT NULL DEFAULT 'publish'
    CHECK (purpose IN ('publish', 'add_variants'));
ALTER TABLE intents DROP CONSTRAINT intents_user_id_version_key;
-- One publish intent per version (an add_variants intent's last column is NULL, which never
-- conflicts), and, like the constraint it replaces, the index that finds a user's intents.
CREATE UNIQUE INDEX intents_one_publish ON intents (user_id, version, nullif(purpose, 'add_variants'));
-- Also what counts the add_variants intents in flight (the walk's bound) without a scan.
CREATE UNIQUE INDEX intents_one_unfinished_add_variants ON intents (user_id, version)
    WHERE purpose = 'add_variants' AND state IN ('pending', 'in_progress');

-- A variant no longer configured, or configured now with another size or type.
ALTER TABLE blob_deletions DROP CONSTRAINT blob_deletions_reason_check;
ALTER TABLE blob_deletions ADD CONSTRAINT blob_deletions_reason_check
    CHECK (reason IN ('replaced', 'superseded', 'deleted', 'failed', 'stray', 'reappeared', 'unconfigured'));

-- The walk that brings every live version to one variant configuration (its canonical text): a
-- pass visits the profiles in user order, resuming after `after_user`, and counts the versions it
-- found to differ (`pass_found`); a pass that found none rests until `rests_until`, then the next pass starts (writes accepted by an API that still
-- had another configuration are found by a later pass). Only the configuration a worker announced
-- last (when it started) is walked to.
CREATE TABLE variant_walks (
    configuration text        PRIMARY KEY,
    announced_at  timestamptz NOT NULL DEFAULT now(),
    after_user    text,
    pass_found    integer     NOT NULL DEFAULT 0,
    passes        integer     NOT NULL DEFAULT 0,
    rests_until   timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- migrate:down

DROP TABLE variant_walks;
-- The variants an add_variants intent was making (rows that still name its keys, never measured) go
-- with it, their keys (maybe uploaded) scheduled for deletion: left behind, such a row would look
-- made to a walk after the migration is applied again, and nothing would ever make it.
WITH unmade AS (
    DELETE FROM version_variants w USING intents i
    WHERE i.purpose = 'add_variants' AND w.user_id = i.user_id AND w.version = i.version
      AND w.blob_key = i.variant_keys ->> w.name AND NOT w.verified
    RETURNING w.blob_key, w.user_id, w.version
)
INSERT INTO blob_deletions (blob_key, user_id, version, reason)
SELECT blob_key, user_id, version, 'failed' FROM unmade
ON CONFLICT (blob_key) DO NOTHING;
DELETE FROM intents WHERE purpose = 'add_variants';
UPDATE blob_deletions SET reason = 'replaced' WHERE reason = 'unconfigured';
ALTER TABLE blob_deletions DROP CONSTRAINT blob_deletions_reason_check;
ALTER TABLE blob_deletions ADD CONSTRAINT blob_deletions_reason_check
    CHECK (reason IN ('replaced', 'superseded', 'deleted', 'failed', 'stray', 'reappeared'));
DROP INDEX intents_one_unfinished_add_variants;
DROP INDEX intents_one_publish;
ALTER TABLE intents ADD CONSTRAINT intents_user_id_version_key UNIQUE (user_id, version);
ALTER TABLE intents DROP COLUMN purpose;
