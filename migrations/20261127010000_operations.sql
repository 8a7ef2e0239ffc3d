-- migrate:up

-- Blobs that no live version needs any more. A row is written in the same transaction that
-- makes its blob unneeded (a newer version went live, a version was superseded or died, the
-- profile was deleted) or by reconciliation (a key the database does not know). The collector
-- deletes it once scheduled_at is older than the grace period, by the database clock, after
-- checking once more that no live or pending version points at it.
CREATE TABLE blob_deletions (
    blob_key     text        PRIMARY KEY,
    user_id      text,
    version      bigint,
    reason       text        NOT NULL
                 CHECK (reason IN ('replaced', 'superseded', 'deleted', 'failed', 'stray', 'reappeared')),
    state        text        NOT NULL DEFAULT 'scheduled' CHECK (state IN ('scheduled', 'deleted', 'kept')),
    -- clock_timestamp, not now(): the grace period must not start before the transaction that
    -- frees the blob (and may have waited for a lock) commits.
    scheduled_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    leased_until timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    finished_at  timestamptz
);
CREATE INDEX blob_deletions_scheduled ON blob_deletions (scheduled_at) WHERE state = 'scheduled';
CREATE INDEX blob_deletions_finished ON blob_deletions (finished_at) WHERE state <> 'scheduled';

-- Replays leave a trace: how often an operator sent the intent round again.
ALTER TABLE intents ADD COLUMN replays integer NOT NULL DEFAULT 0;

-- Operators list dead intents and page through all of them; pruning walks finished ones by age.
CREATE INDEX intents_dead ON intents (updated_at) WHERE state = 'dead';
CREATE INDEX intents_finished ON intents (updated_at) WHERE state IN ('done', 'superseded');
CREATE INDEX intents_created ON intents (created_at, id);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- One row per periodic task that only one worker should run per interval (reconciliation);
-- workers race for it with a conditional UPDATE, so no leader is needed.
CREATE TABLE maintenance_runs (
    task            text        PRIMARY KEY,
    last_started_at timestamptz NOT NULL
);

-- Storage settings of the hot tables, chosen on purpose:
-- * profiles is updated on every write and every publish, but never in an indexed column, so
--   its updates can be HOT (heap-only) if the page has room: leave 10 % free for them.
-- * intents is updated three or four times per write (claim, finish, sometimes a retry), and
--   those updates change indexed columns (state, next_attempt_at), so they cannot be HOT;
--   instead dead tuples pile up fast. Vacuum it after 2 % of rows changed (default 20 %) so the
--   claim index stays small; pruning deletes finished rows in batches for the same reason.
-- * staged_images is insert-once, delete-once with large TOASTed values: vacuum it often too,
--   so the space of published images is reused quickly.
ALTER TABLE profiles SET (fillfactor = 90);
ALTER TABLE intents SET (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.02,
                         autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE staged_images SET (autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE blob_deletions SET (autovacuum_vacuum_scale_factor = 0.05);

-- migrate:down

ALTER TABLE staged_images RESET (autovacuum_vacuum_scale_factor);
ALTER TABLE intents RESET (fillfactor, autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor);
ALTER TABLE profiles RESET (fillfactor);
DROP TABLE maintenance_runs;
DROP INDEX idempotency_keys_created;
DROP INDEX intents_created;
DROP INDEX intents_finished;
DROP INDEX intents_dead;
ALTER TABLE intents DROP COLUMN replays;
DROP TABLE blob_deletions;
