-- migrate:up

-- One row per user: the live pointer and the newest accepted version. Writers for one user
-- serialise on this row, which is what numbers versions in acceptance order. `deleted` says the
-- newest accepted version is a tombstone: kept here, on the locked row, because a writer that
-- waited for the lock must see it as of after the wait (a subquery would see its old snapshot).
CREATE TABLE profiles (
    user_id        text        PRIMARY KEY,
    newest_version bigint      NOT NULL DEFAULT 0,
    deleted        boolean     NOT NULL DEFAULT false,
    live_version   bigint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Every accepted write (kind 'put') and every DELETE (kind 'delete', a tombstone) of a user.
-- state: pending until its blob is verified; then published (it went live), or superseded (a
-- newer version was already live), or failed (its intent died).
CREATE TABLE versions (
    user_id      text        NOT NULL REFERENCES profiles (user_id),
    version      bigint      NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('put', 'delete')),
    state        text        NOT NULL CHECK (state IN ('pending', 'published', 'superseded', 'failed')),
    metadata     jsonb,
    blob_key     text        UNIQUE,
    sha256       text,
    size         integer,
    content_type text,
    width        integer,
    height       integer,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    PRIMARY KEY (user_id, version),
    CONSTRAINT put_has_image CHECK (
        (kind = 'put') = (metadata IS NOT NULL AND blob_key IS NOT NULL AND sha256 IS NOT NULL
                          AND size IS NOT NULL AND content_type IS NOT NULL
                          AND width IS NOT NULL AND height IS NOT NULL)
    )
);

ALTER TABLE profiles
    ADD CONSTRAINT live_version_exists
    FOREIGN KEY (user_id, live_version) REFERENCES versions (user_id, version);

-- The outbox. next_attempt_at is when the intent may next be claimed: for a pending intent the
-- end of its back-off, for an in_progress one the end of its lease (when another worker may
-- take over). lease_token fences completion: it changes at every claim.
CREATE TABLE intents (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         text        NOT NULL,
    version         bigint      NOT NULL,
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'in_progress', 'done', 'superseded', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL CHECK (max_attempts > 0),
    lease_token     uuid,
    lease_owner     text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, version),
    FOREIGN KEY (user_id, version) REFERENCES versions (user_id, version)
);

-- Claiming reads only unfinished intents, so this index stays small however many finished
-- rows the table holds.
CREATE INDEX intents_due ON intents (next_attempt_at) WHERE state IN ('pending', 'in_progress');

-- Image bytes wait here until their upload is verified. They live apart from the intents so
-- that claim scans and updates of the hot intent rows never touch megabytes of TOAST.
CREATE TABLE staged_images (
    intent_id uuid  PRIMARY KEY REFERENCES intents (id) ON DELETE CASCADE,
    data      bytea NOT NULL
);
-- Images are already compressed: skip PostgreSQL's futile attempt to compress them again.
ALTER TABLE staged_images ALTER COLUMN data SET STORAGE EXTERNAL;

-- The first response to each (user, Idempotency-Key), replayed to retries.
CREATE TABLE idempotency_keys (
    user_id         text        NOT NULL,
    key             text        NOT NULL,
    request_hash    text        NOT NULL,
    response_status integer     NOT NULL,
    response_body   jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

-- migrate:down

DROP TABLE idempotency_keys;
DROP TABLE staged_images;
DROP TABLE intents;
ALTER TABLE profiles DROP CONSTRAINT live_version_exists;
DROP TABLE versions;
DROP TABLE profiles;
