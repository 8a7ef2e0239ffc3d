-- migrate:up

-- Bulk replays asked for in the operator console (/admin/), run by the workers' maintenance loop
-- (any worker; a lease, not a leader). `token` is the idempotency token of the form that asked for
-- it: the same form submitted twice is one job. The intents a job replays are fixed when a worker
-- starts it (replay_job_intents), so it covers everything that matched then, however many pages,
-- and a worker that takes over an expired lease carries on where the last one stopped.
CREATE TABLE replay_jobs (
    id                 uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    token              text        NOT NULL UNIQUE,
    selection          text        NOT NULL CHECK (selection IN ('dead', 'stuck')),
    user_id            text,
    older_than_seconds float8,
    requested_by       text        NOT NULL,
    state              text        NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done')),
    total              integer,
    lease_token        uuid,
    lease_owner        text,
    leased_until       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz
);
CREATE INDEX replay_jobs_unfinished ON replay_jobs (created_at) WHERE state <> 'done';
CREATE INDEX replay_jobs_created ON replay_jobs (created_at);

-- What a job does to each intent: outcome is NULL until it is replayed (or refused), then one of
-- service.core.operations.ReplayOutcome. No foreign key to intents: pruning may remove an intent,
-- and the report of the job stays as it was.
CREATE TABLE replay_job_intents (
    job_id    uuid    NOT NULL REFERENCES replay_jobs (id) ON DELETE CASCADE,
    intent_id uuid    NOT NULL,
    position  integer NOT NULL,
    outcome   text,
    PRIMARY KEY (job_id, intent_id)
);
CREATE INDEX replay_job_intents_todo ON replay_job_intents (job_id, position) WHERE outcome IS NULL;

-- Signed-in console sessions. The cookie carries a random id; only its SHA-256 is kept, so a copy
-- of this table opens no session. Signing out deletes the row, and every request checks that its
-- row is still there and unexpired; expired rows are pruned (Pruned.CONSOLE_SESSIONS).
CREATE TABLE console_sessions (
    id_sha256  bytea       PRIMARY KEY,
    subject    text        NOT NULL,
    csrf       text        NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);

-- When each periodic task last finished and what it reported (the console shows reconciliation's).
ALTER TABLE maintenance_runs ADD COLUMN last_finished_at timestamptz, ADD COLUMN last_report jsonb;

-- migrate:down

ALTER TABLE maintenance_runs DROP COLUMN last_report, DROP COLUMN last_finished_at;
DROP TABLE console_sessions;
DROP TABLE replay_job_intents;
DROP TABLE replay_jobs;
