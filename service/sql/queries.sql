-- Every query the service runs, loaded by name (service/queries.py).

-- name: try_lock_idempotency_key
-- Held until the write transaction ends: a concurrent retry with the same key gets 409 at once.
SELECT pg_try_advisory_xact_lock(hashtextextended($1 || E'\n' || $2, 0));

-- name: get_idempotency_record
SELECT request_hash, response_status, response_body
FROM idempotency_keys
WHERE user_id = $1 AND key = $2;

-- name: save_idempotency_record
INSERT INTO idempotency_keys (user_id, key, request_hash, response_status, response_body)
VALUES ($1, $2, $3, $4, $5);

-- name: lock_profile_for_write
-- Creates the profile row on a user's first write; either way the row stays locked until commit,
-- which serialises writers of one user and so numbers their versions in acceptance order.
INSERT INTO profiles AS p (user_id) VALUES ($1)
ON CONFLICT (user_id) DO UPDATE SET updated_at = now()
RETURNING p.newest_version,
          p.live_version,
          (SELECT v.kind FROM versions v
           WHERE v.user_id = p.user_id AND v.version = p.newest_version) AS newest_kind;

-- name: lock_existing_profile
SELECT p.newest_version,
       p.live_version,
       (SELECT v.kind FROM versions v
        WHERE v.user_id = p.user_id AND v.version = p.newest_version) AS newest_kind
FROM profiles p
WHERE p.user_id = $1
FOR UPDATE;

-- name: accept_put
-- The next version, its blob key, its intent and its staged bytes, in one statement.
WITH bumped AS (
    UPDATE profiles SET newest_version = newest_version + 1, updated_at = now()
    WHERE user_id = $1
    RETURNING user_id, newest_version AS version
), new_version AS (
    INSERT INTO versions (user_id, version, kind, state, metadata, blob_key, sha256, size,
                          content_type, width, height)
    SELECT user_id, version, 'put', 'pending', $2, $3, $4, $5, $6, $7, $8 FROM bumped
    RETURNING user_id, version
), new_intent AS (
    INSERT INTO intents (user_id, version, max_attempts)
    SELECT user_id, version, $9 FROM new_version
    RETURNING id, user_id, version, state
), staged AS (
    INSERT INTO staged_images (intent_id, data) SELECT id, $10 FROM new_intent
)
SELECT id, version, state FROM new_intent;

-- name: accept_delete
-- A tombstone goes live at once; intents of older versions will find a newer live version.
WITH bumped AS (
    UPDATE profiles SET newest_version = newest_version + 1, live_version = newest_version + 1,
                        updated_at = now()
    WHERE user_id = $1
    RETURNING user_id, newest_version AS version
)
INSERT INTO versions (user_id, version, kind, state, published_at)
SELECT user_id, version, 'delete', 'published', now() FROM bumped
RETURNING version;

-- name: notify_intents
SELECT pg_notify('profiles_intents', $1::text);

-- name: get_live_version
SELECT v.user_id, v.version, v.kind, v.metadata, v.blob_key, v.sha256, v.size, v.content_type,
       v.width, v.height, v.published_at
FROM profiles p
JOIN versions v ON v.user_id = p.user_id AND v.version = p.live_version
WHERE p.user_id = $1;

-- name: get_published_version
SELECT v.user_id, v.version, v.kind, v.metadata, v.blob_key, v.sha256, v.size, v.content_type,
       v.width, v.height, v.published_at
FROM versions v
WHERE v.user_id = $1 AND v.version = $2 AND v.kind = 'put' AND v.state = 'published';

-- name: get_intent
SELECT i.id, i.user_id, i.version, v.kind, i.state, i.attempts, i.max_attempts, i.last_error,
       i.created_at, i.updated_at, i.next_attempt_at
FROM intents i
JOIN versions v ON v.user_id = i.user_id AND v.version = i.version
WHERE i.id = $1;

-- name: claim_intents
-- Takes up to $1 due intents that no other worker holds, charging the attempt and setting a
-- fresh lease. An intent whose final attempt lost its lease (its worker died) has no attempt
-- left: it dies here instead, and is not returned.
WITH due AS (
    SELECT id FROM intents
    WHERE state IN ('pending', 'in_progress') AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE intents i
    SET state = CASE WHEN i.attempts < i.max_attempts THEN 'in_progress' ELSE 'dead' END,
        attempts = LEAST(i.attempts + 1, i.max_attempts),
        lease_token = CASE WHEN i.attempts < i.max_attempts THEN gen_random_uuid() END,
        lease_owner = CASE WHEN i.attempts < i.max_attempts THEN $2 END,
        next_attempt_at = now() + make_interval(secs => $3),
        last_error = CASE WHEN i.attempts < i.max_attempts THEN i.last_error
                          ELSE concat_ws('; ', i.last_error, 'the final attempt lost its lease') END,
        updated_at = now()
    FROM due
    WHERE i.id = due.id
    RETURNING i.id, i.user_id, i.version, i.state, i.attempts, i.max_attempts, i.lease_token,
              i.created_at
), failed AS (
    UPDATE versions v SET state = 'failed'
    FROM claimed c
    WHERE c.state = 'dead' AND v.user_id = c.user_id AND v.version = c.version
)
SELECT c.id, c.user_id, c.version, c.attempts, c.max_attempts, c.lease_token, c.created_at,
       v.blob_key, v.sha256, v.size, v.content_type, p.live_version
FROM claimed c
JOIN versions v ON v.user_id = c.user_id AND v.version = c.version
JOIN profiles p ON p.user_id = c.user_id
WHERE c.state = 'in_progress'
ORDER BY c.created_at;

-- name: get_staged_image
SELECT data FROM staged_images WHERE intent_id = $1;

-- name: lock_profile_for_publish
SELECT live_version FROM profiles WHERE user_id = $1 FOR UPDATE;

-- name: finish_intent
-- Fenced: only the holder of the current lease finishes the intent. $3 is 'done' (the version
-- goes live) or 'superseded' (a newer version already is).
WITH finished AS (
    UPDATE intents
    SET state = $3, lease_token = NULL, last_error = NULL, next_attempt_at = now(), updated_at = now()
    WHERE id = $1 AND lease_token = $2 AND state = 'in_progress'
    RETURNING id, user_id, version
), unstaged AS (
    DELETE FROM staged_images s USING finished f WHERE s.intent_id = f.id
), marked AS (
    UPDATE versions v
    SET state = CASE WHEN $3 = 'done' THEN 'published' ELSE 'superseded' END,
        published_at = CASE WHEN $3 = 'done' THEN now() END
    FROM finished f
    WHERE v.user_id = f.user_id AND v.version = f.version
)
SELECT count(*) FROM finished;

-- name: set_live_version
UPDATE profiles SET live_version = $2, updated_at = now() WHERE user_id = $1;

-- name: notify_intent_finished
SELECT pg_notify('profiles_intent_finished', $1::text);

-- name: fail_attempt
-- Fenced like finish_intent. With attempts left the intent waits $3 seconds; without, it dies.
WITH failed AS (
    UPDATE intents
    SET state = CASE WHEN attempts < max_attempts THEN 'pending' ELSE 'dead' END,
        next_attempt_at = now() + make_interval(secs => $3),
        last_error = $4, lease_token = NULL, lease_owner = NULL, updated_at = now()
    WHERE id = $1 AND lease_token = $2 AND state = 'in_progress'
    RETURNING user_id, version, state
), marked AS (
    UPDATE versions v SET state = 'failed'
    FROM failed f
    WHERE f.state = 'dead' AND v.user_id = f.user_id AND v.version = f.version
)
SELECT state FROM failed;

-- name: release_intent
-- A worker shutting down hands an intent back without charging it a failure.
UPDATE intents
SET state = 'pending', next_attempt_at = now(), lease_token = NULL, lease_owner = NULL,
    updated_at = now()
WHERE id = $1 AND lease_token = $2 AND state = 'in_progress';

-- name: ping
SELECT 1;
