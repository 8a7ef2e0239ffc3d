-- Every query the service runs, loaded by name (service/core/queries.py). Every state change
-- notifies in the statement that makes it (PostgreSQL delivers the notification at commit). Blobs
-- are retired by triggers, and "still needed" is one function: see migrations/*_structure.sql.

-- name: try_lock_idempotency_key
-- Held until the write transaction ends: a concurrent retry with the same key gets 409 at once.
SELECT pg_try_advisory_xact_lock(hashtextextended($1 || E'\n' || $2, 0));

-- name: get_idempotency_record
SELECT request_hash, accepted
FROM idempotency_keys
WHERE user_id = $1 AND key = $2;

-- name: save_idempotency_record
INSERT INTO idempotency_keys (user_id, key, request_hash, accepted)
VALUES ($1, $2, $3, $4);

-- name: lock_existing_profile
SELECT p.newest_version, p.live_version, p.deleted
FROM profiles p
WHERE p.user_id = $1
FOR UPDATE;

-- name: accept_put
-- The next version, its blob key, its variants' keys ($11: [{name, box, blob_key, content_type}]),
-- its intent (with the accepting request's traceparent $12, or NULL) and its staged bytes, in one
-- statement. The profile row is created on a user's first write, and either way it stays locked
-- until commit, which serialises writers of one user and so numbers their versions in acceptance
-- order. The head as it was before comes back for the caller's preconditions: one that fails rolls
-- the whole transaction back.
WITH bumped AS (
    INSERT INTO profiles AS p (user_id, newest_version) VALUES ($1, 1)
    ON CONFLICT (user_id) DO UPDATE SET newest_version = p.newest_version + 1, updated_at = now()
    RETURNING p.user_id, p.newest_version AS version, p.live_version, p.deleted
), new_version AS (
    INSERT INTO versions (user_id, version, kind, state, metadata, blob_key, sha256, size,
                          content_type, width, height)
    SELECT user_id, version, 'put', 'pending', $2, $3, $4, $5, $6, $7, $8 FROM bumped
    RETURNING user_id, version
), variant AS (
    SELECT x.name, x.box, x.blob_key, x.content_type
    FROM jsonb_to_recordset($11::jsonb) AS x(name text, box integer, blob_key text, content_type text)
), new_variants AS (
    INSERT INTO version_variants (user_id, version, name, box, blob_key, content_type)
    SELECT n.user_id, n.version, x.name, x.box, x.blob_key, x.content_type FROM new_version n, variant x
), new_intent AS (
    INSERT INTO intents (user_id, version, max_attempts, blob_key, variant_keys, traceparent)
    SELECT user_id, version, $9, $3, (SELECT coalesce(jsonb_object_agg(name, blob_key), '{}') FROM variant), $12
    FROM new_version
    RETURNING id, user_id, version, state, next_attempt_at
), staged AS (
    INSERT INTO staged_images (intent_id, data) SELECT id, $10 FROM new_intent
)
-- The notification wakes the workers; PostgreSQL delivers it only when the transaction commits. It
-- names the intent and when it became due (epoch seconds; notifications.due_time reads it): a
-- worker's scan resumes where it reached (claim_intents), and goes back for an intent that committed
-- after the scan passed its place. Every notice on profiles_intents says the same.
SELECT n.id, n.version, n.state, b.version - 1 AS newest_version, b.live_version, b.deleted,
       pg_notify('profiles_intents', n.id || ' ' || extract(epoch FROM n.next_attempt_at))
FROM new_intent n, bumped b;

-- name: accept_delete
-- A tombstone goes live at once; intents of older versions will find a newer live version.
-- The blob of the version that was live is retired (trigger retire_replaced_blob).
WITH bumped AS (
    UPDATE profiles SET newest_version = newest_version + 1, live_version = newest_version + 1,
                        deleted = true, updated_at = now()
    WHERE user_id = $1
    RETURNING user_id, newest_version AS version
)
INSERT INTO versions (user_id, version, kind, state, published_at)
SELECT user_id, version, 'delete', 'published', now() FROM bumped
RETURNING version;

-- name: get_live_version
SELECT v.user_id, v.version, v.metadata, v.blob_key, v.sha256, v.size, v.content_type,
       v.width, v.height, v.published_at, measured_variants(v.user_id, v.version) AS variants
FROM profiles p
JOIN versions v ON v.user_id = p.user_id AND v.version = p.live_version
WHERE p.user_id = $1 AND v.kind = 'put';

-- name: get_published_version
SELECT v.user_id, v.version, v.metadata, v.blob_key, v.sha256, v.size, v.content_type,
       v.width, v.height, v.published_at, measured_variants(v.user_id, v.version) AS variants
FROM versions v
WHERE v.user_id = $1 AND v.version = $2 AND v.kind = 'put' AND v.state = 'published'
  -- Once a DELETE answered, no version at or below its tombstone is served.
  AND NOT EXISTS (SELECT 1 FROM versions t WHERE t.user_id = $1 AND t.version > $2 AND t.kind = 'delete');

-- name: get_intent
SELECT i.id, i.user_id, i.version, v.kind, i.purpose, i.state, i.attempts, i.max_attempts, i.last_error,
       i.created_at, i.updated_at, i.next_attempt_at
FROM intents i
JOIN versions v ON v.user_id = i.user_id AND v.version = i.version
WHERE i.id = $1;

-- name: claim_intents
-- Takes up to $1 due intents that no other worker holds, charging the attempt and setting a
-- fresh lease. An intent whose final attempt lost its lease (its worker died) has no attempt
-- left: it dies here instead, and is not returned. The key to upload to comes from the intent
-- row as locked (RETURNING shows its newest committed state): the versions row joined below is
-- read as of the statement's snapshot, which misses a replay that committed while this
-- statement waited for the row (and gave the version a fresh key).
-- The scan starts at due time $4 (the earliest there is: from the start). Every claimed intent
-- leaves behind an index entry at the front of intents_due, dead but walked by every later scan
-- from the start until PostgreSQL can mark it so, which it cannot while any snapshot in the
-- database is older than the claim (a report, a dump, an ANALYZE of a large table): a snapshot held
-- 25 s made the due scans read 70 times the entries and slowed a drain by a third, and every second
-- it is held adds another second of claims to every scan. Which intents a claim takes is never a
-- question of safety (any due intent may be claimed), only of when: see workers.outbox.ScanStart.
WITH due AS (
    SELECT id, next_attempt_at FROM intents
    WHERE state IN ('pending', 'in_progress') AND next_attempt_at <= now() AND next_attempt_at >= $4
    ORDER BY next_attempt_at
    -- A subquery, not $1: no plan knows the limit then, so every plan costs it as the cached
    -- generic plan does (a tenth of the due rows) and PostgreSQL keeps that plan after its first
    -- five. With a bare $1 the custom plans looked cheaper whenever the due rows were many, and it
    -- re-planned nearly every claim (1–1.5 ms each at 10,000 due and more). The plan is the same
    -- either way: it stops after the rows it locks.
    LIMIT (SELECT $1::integer)
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
    -- An array, not a join with due: a cached generic plan guesses LIMIT $1 at a tenth of the
    -- table and would hash-join a sequential scan of intents (40 ms at 100,000 rows); this way
    -- every plan looks the rows up by primary key.
    WHERE i.id = ANY (ARRAY(SELECT id FROM due))
    RETURNING i.id, i.user_id, i.version, i.purpose, i.state, i.attempts, i.lease_token, i.blob_key,
              i.variant_keys, i.created_at, i.traceparent, i.replay_traceparent
), failed AS (
    -- The lost attempt may have uploaded the blob: the version's failure retires it (trigger
    -- retire_unpublished_blob). The notification wakes a `Prefer: wait` request waiting for this intent.
    -- An add_variants intent that dies leaves its version as it is (live, without those variants).
    UPDATE versions v SET state = 'failed'
    FROM claimed c
    WHERE c.state = 'dead' AND c.purpose = 'publish' AND v.user_id = c.user_id AND v.version = c.version
    RETURNING pg_notify('profiles_intent_finished', c.id::text)
)
-- The staged bytes come along (one round trip per claim, not one per intent). They are the
-- snapshot's, and they are there: they were committed with the intent, and only a publish of this
-- intent removes them, which needs the lease this statement has just taken (an add_variants intent
-- has none: its worker reads the published original). The variants to make are those the intent
-- names, with their keys as locked (from the intent row); their boxes and types change only with
-- their key.
SELECT c.id, c.user_id, c.version, c.purpose, c.attempts, c.lease_token,
       (SELECT max(next_attempt_at) FROM due) AS scan_reached,
       extract(epoch FROM now() - c.created_at)::float8 AS queued_seconds,
       c.blob_key, v.sha256, v.size, v.content_type, p.live_version, c.traceparent, c.replay_traceparent, s.data,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'name', w.name, 'box', w.box, 'content_type', w.content_type,
                    'blob_key', c.variant_keys ->> w.name) ORDER BY w.box), '[]')
        FROM version_variants w
        WHERE w.user_id = c.user_id AND w.version = c.version AND c.variant_keys ? w.name) AS variants
FROM claimed c
JOIN versions v ON v.user_id = c.user_id AND v.version = c.version
JOIN profiles p ON p.user_id = c.user_id
LEFT JOIN staged_images s ON s.intent_id = c.id
WHERE c.state = 'in_progress'
ORDER BY c.created_at;

-- name: publish_intents
-- Publishes a batch in one statement: intent $1[n], uploaded to $3[n], for the holder of lease
-- $2[n], with the variants it uploaded ($4: [{intent_id, name, blob_key, width, height, size,
-- sha256}]). A version goes live only with every variant it names uploaded to the key it names
-- now, measured in this same statement; one that can only be superseded needs none. The worker
-- puts at most one intent of a user in a batch, so the rows touch disjoint
-- profiles, versions and keys and each is decided exactly as if it were alone; a row whose fence
-- fails is left out of the answer and changes nothing. Fenced: only the holder of the current lease
-- finishes an intent, and only while its version is pending and still names the key that was
-- uploaded, so no version ever goes live pointing at a key nobody uploaded. The profile rows are
-- locked first (in user order, so that batches never deadlock), as every writer of a user does;
-- a profile that another transaction holds is skipped, never waited for (one user's slow writer
-- must not hold up the others), and its intent answered as 'busy', untouched: the worker
-- publishes it on its own, in a transaction that has waited for that profile first (SKIP LOCKED
-- does not skip a row the transaction itself holds). A version then goes live if it is newer than
-- the live one, else it is superseded. Either way one
-- blob stops being needed (the one that was live, or this version's own) and its trigger retires
-- it. Rows read under a lock show their latest committed state (live_version); rows read without
-- one show the snapshot, which is enough only for what cannot change while the lease is held.
WITH batch AS (
    SELECT b.id, b.lease_token, b.blob_key
    FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS b(id, lease_token, blob_key)
), uploaded AS (
    SELECT u.*
    FROM jsonb_to_recordset($4::jsonb)
         AS u(intent_id uuid, name text, blob_key text, width integer, height integer, size integer, sha256 text)
), profile AS (
    SELECT p.user_id, p.live_version
    FROM profiles p
    WHERE p.user_id IN (SELECT i.user_id FROM intents i JOIN batch b ON b.id = i.id)
    ORDER BY p.user_id
    FOR UPDATE OF p SKIP LOCKED
), finished AS (
    UPDATE intents i
    SET state = CASE WHEN p.live_version IS NULL OR i.version > p.live_version THEN 'done' ELSE 'superseded' END,
        lease_token = NULL, last_error = NULL, next_attempt_at = now(), updated_at = now()
    FROM batch b, profile p, versions v
    -- The fenced state is a subquery, not a constant, so that no plan can prove the partial due
    -- index's condition and read the intents through it: vacuumed while nothing was due, that index
    -- counts as empty until the next analyze, and when a backlog formed since, a plan that scanned
    -- all of it looked cheapest (100,000 entries, 3,000 buffers for a batch of 16; by primary key
    -- the whole statement reads 640). Every fenced statement on intents does the same.
    WHERE i.id = b.id AND i.lease_token = b.lease_token AND i.state = (SELECT 'in_progress')
      AND i.blob_key = b.blob_key
      AND p.user_id = i.user_id
      AND v.user_id = i.user_id AND v.version = i.version AND v.blob_key = b.blob_key AND v.state = 'pending'
      AND ((p.live_version IS NOT NULL AND i.version <= p.live_version) OR NOT EXISTS (
          SELECT 1 FROM version_variants w
          WHERE w.user_id = i.user_id AND w.version = i.version
            AND NOT EXISTS (SELECT 1 FROM uploaded u WHERE u.intent_id = i.id AND u.name = w.name
                                                       AND u.blob_key = w.blob_key)))
    RETURNING i.id, i.user_id, i.version, i.state
), measured AS (
    UPDATE version_variants w
    SET width = u.width, height = u.height, size = u.size, sha256 = u.sha256, verified = true
    FROM finished f JOIN uploaded u ON u.intent_id = f.id
    WHERE f.state = 'done' AND w.user_id = f.user_id AND w.version = f.version AND w.name = u.name
), unstaged AS (
    DELETE FROM staged_images s USING finished f WHERE s.intent_id = f.id
), marked AS (
    UPDATE versions v
    SET state = CASE WHEN f.state = 'done' THEN 'published' ELSE 'superseded' END,
        published_at = CASE WHEN f.state = 'done' THEN now() END
    FROM finished f
    WHERE v.user_id = f.user_id AND v.version = f.version
), moved AS (
    UPDATE profiles p SET live_version = f.version, deleted = false, updated_at = now()
    FROM finished f
    WHERE f.state = 'done' AND p.user_id = f.user_id
), notified AS (
    SELECT f.id, f.state, pg_notify('profiles_intent_finished', f.id::text) FROM finished f
)
SELECT id, state FROM notified
UNION ALL
SELECT b.id, 'busy'
FROM batch b JOIN intents i ON i.id = b.id
WHERE NOT EXISTS (SELECT 1 FROM profile p WHERE p.user_id = i.user_id);

-- name: fail_attempt
-- Fenced like publish_intents. With attempts left (and a failure that another attempt may not
-- repeat: $5 is false) the intent waits $3 seconds; otherwise it dies:
-- its version fails (an upload may have happened before the failure: the trigger retires the
-- blob) and a `Prefer: wait` request waiting for it is woken.
WITH failed AS (
    UPDATE intents
    SET state = CASE WHEN attempts < max_attempts AND NOT $5 THEN 'pending' ELSE 'dead' END,
        next_attempt_at = now() + make_interval(secs => $3),
        last_error = $4, lease_token = NULL, lease_owner = NULL, updated_at = now()
    WHERE id = $1 AND lease_token = $2 AND state = (SELECT 'in_progress')  -- see publish_intents
    RETURNING id, user_id, version, purpose, state
), marked AS (
    UPDATE versions v SET state = 'failed'
    FROM failed f
    WHERE f.state = 'dead' AND f.purpose = 'publish' AND v.user_id = f.user_id AND v.version = f.version
    RETURNING pg_notify('profiles_intent_finished', f.id::text)
)
SELECT state FROM failed;

-- name: release_intent
-- A worker shutting down hands an intent back, refunding the attempt it had charged. The notice
-- (as accept_put's) wakes the other workers and sends their scans back to it.
UPDATE intents
SET state = 'pending', attempts = attempts - 1, next_attempt_at = now(), lease_token = NULL,
    lease_owner = NULL, updated_at = now()
WHERE id = $1 AND lease_token = $2 AND state = (SELECT 'in_progress')  -- see publish_intents
RETURNING pg_notify('profiles_intents', id || ' ' || extract(epoch FROM next_attempt_at));

-- name: attach_variants
-- Finishes add_variants intent $1 for the holder of lease $2 with the variants it uploaded ($3:
-- [{name, blob_key, width, height, size, sha256}]): each is measured, and served from then on, if its
-- row still names the key it was uploaded to. Only while the version is live, as read under a share
-- lock on the profile (every writer that moves the live pointer waits for it): otherwise the intent is
-- superseded and nothing is attached (the version's blobs were retired when it stopped being live).
WITH profile AS (
    SELECT p.user_id, p.live_version
    FROM profiles p JOIN intents i ON i.user_id = p.user_id
    WHERE i.id = $1
    FOR SHARE OF p
), finished AS (
    UPDATE intents i
    SET state = CASE WHEN p.live_version = i.version THEN 'done' ELSE 'superseded' END,
        lease_token = NULL, last_error = NULL, next_attempt_at = now(), updated_at = now()
    FROM profile p
    WHERE i.id = $1 AND i.lease_token = $2 AND i.state = (SELECT 'in_progress') AND i.purpose = 'add_variants'
    RETURNING i.id, i.user_id, i.version, i.state
), measured AS (
    UPDATE version_variants w
    SET width = u.width, height = u.height, size = u.size, sha256 = u.sha256, verified = true
    FROM finished f,
         jsonb_to_recordset($3::jsonb)
         AS u(name text, blob_key text, width integer, height integer, size integer, sha256 text)
    WHERE f.state = 'done' AND w.user_id = f.user_id AND w.version = f.version
      AND w.name = u.name AND w.blob_key = u.blob_key
)
SELECT state, pg_notify('profiles_intent_finished', id::text) FROM finished;

-- name: announce_variant_configuration
-- A worker starting with configuration $1: the newest configuration announced is the one walked to.
-- One announced again after another (a rollback) starts a pass at once, from the first profile: where
-- its walk stopped, and its rest, were about live versions as they were before the other changed them.
-- Announcing the newest one again changes nothing.
INSERT INTO variant_walks AS w (configuration) VALUES ($1)
ON CONFLICT (configuration) DO UPDATE
SET announced_at = now(), after_user = NULL, pass_found = 0, rests_until = NULL, updated_at = now()
WHERE w.announced_at < (SELECT max(announced_at) FROM variant_walks);

-- name: lock_variant_walk
-- The walk toward configuration $1, locked for one round (a worker that finds it locked skips the
-- round), with the add_variants intents in flight (the walk's bound, from their partial index).
-- `newest`: no worker started with another configuration since one started with this one (a
-- worker still running an older configuration during a rolling deploy must not undo the new one).
SELECT w.after_user, coalesce(w.rests_until > now(), false) AS resting,
       w.announced_at >= (SELECT max(announced_at) FROM variant_walks) AS newest,
       (SELECT count(*) FROM intents
        WHERE purpose = 'add_variants' AND state IN ('pending', 'in_progress')) AS in_flight
FROM variant_walks w
WHERE w.configuration = $1
FOR UPDATE SKIP LOCKED;

-- name: variant_walk_window
-- Where a round of the walk that resumes after $1 stops looking: the $2-th profile after it, in user
-- order (NULL: fewer are left, so this round can end the pass).
SELECT user_id FROM profiles
WHERE $1::text IS NULL OR user_id > $1
ORDER BY user_id
OFFSET $2 - 1
LIMIT 1;

-- name: find_variant_work
-- Up to $3 live versions of profiles after $1 and up to $4 (if not NULL), in user order, whose
-- variants differ from the configuration $2 ([{name, box, content_type}]): a configured variant
-- missing or made to another size or type, or a variant no longer configured. `busy`: an
-- add_variants intent of the version is in flight (left to a later pass). Read without locks:
-- refresh_variants re-checks.
WITH configured AS (
    SELECT * FROM jsonb_to_recordset($2::jsonb) AS c(name text, box integer, content_type text)
)
SELECT p.user_id, p.live_version AS version,
       EXISTS (SELECT 1 FROM intents i
               WHERE i.user_id = p.user_id AND i.version = p.live_version
                 AND i.purpose = 'add_variants' AND i.state IN ('pending', 'in_progress')) AS busy
FROM profiles p
JOIN versions v ON v.user_id = p.user_id AND v.version = p.live_version AND v.kind = 'put'
WHERE ($1::text IS NULL OR p.user_id > $1) AND ($4::text IS NULL OR p.user_id <= $4)
  AND (EXISTS (SELECT 1 FROM configured c
               WHERE NOT EXISTS (SELECT 1 FROM version_variants w
                                 WHERE w.user_id = p.user_id AND w.version = p.live_version
                                   AND w.name = c.name AND w.box = c.box AND w.content_type = c.content_type))
       OR EXISTS (SELECT 1 FROM version_variants w
                  WHERE w.user_id = p.user_id AND w.version = p.live_version
                    AND NOT EXISTS (SELECT 1 FROM configured c
                                    WHERE c.name = w.name AND c.box = w.box AND c.content_type = w.content_type)))
ORDER BY p.user_id
LIMIT $3;

-- name: refresh_variants
-- Brings live version $2 of $1 to the configuration $3 ([{name, box, content_type, blob_key}]: each
-- configured variant with a fresh key): a variant no longer configured is removed, one configured
-- with another size or type gets the new ones and its fresh key (unmeasured: not served), a missing
-- one gets a row; the old keys are scheduled for deletion, and one add_variants intent ($4 attempts)
-- makes and attaches what is new. A configured variant never measured is made again too, under a
-- fresh key: the add_variants intent that was to make it died (none is in flight), and a replay of
-- that one would then find nothing left to make. Run under the profile's lock, taken before by a
-- statement of its own (see refresh_variants in repository.py), as every writer of the user takes
-- it; nothing changes if the version is no longer live or an add_variants intent of it is in flight.
WITH profile AS (
    SELECT user_id, live_version FROM profiles WHERE user_id = $1 AND live_version = $2
), target AS (
    SELECT v.user_id, v.version, v.blob_key
    FROM versions v JOIN profile p ON p.user_id = v.user_id AND p.live_version = v.version
    WHERE v.kind = 'put'
      AND NOT EXISTS (SELECT 1 FROM intents i
                      WHERE i.user_id = v.user_id AND i.version = v.version
                        AND i.purpose = 'add_variants' AND i.state IN ('pending', 'in_progress'))
), configured AS (
    SELECT * FROM jsonb_to_recordset($3::jsonb) AS c(name text, box integer, content_type text, blob_key text)
), current AS (
    SELECT w.user_id, w.version, w.name, w.box, w.content_type, w.blob_key, w.verified
    FROM version_variants w JOIN target t ON w.user_id = t.user_id AND w.version = t.version
), unconfigured AS (
    DELETE FROM version_variants w USING current o
    WHERE w.user_id = o.user_id AND w.version = o.version AND w.name = o.name
      AND o.name NOT IN (SELECT name FROM configured)
), outdated AS (
    SELECT c.name, c.box, c.content_type, c.blob_key
    FROM configured c JOIN current o ON o.name = c.name
    WHERE o.box <> c.box OR o.content_type <> c.content_type OR NOT o.verified
), rekeyed AS (
    UPDATE version_variants w
    SET box = d.box, content_type = d.content_type, blob_key = d.blob_key,
        width = NULL, height = NULL, size = NULL, sha256 = NULL, verified = false
    FROM target t, outdated d
    WHERE w.user_id = t.user_id AND w.version = t.version AND w.name = d.name
), missing AS (
    SELECT c.name, c.box, c.content_type, c.blob_key
    FROM configured c, target t
    WHERE c.name NOT IN (SELECT name FROM current)
), added AS (
    INSERT INTO version_variants (user_id, version, name, box, blob_key, content_type)
    SELECT t.user_id, t.version, m.name, m.box, m.blob_key, m.content_type FROM target t, missing m
), retired AS (
    INSERT INTO blob_deletions (blob_key, user_id, version, reason)
    SELECT o.blob_key, o.user_id, o.version, CASE WHEN o.verified THEN 'unconfigured' ELSE 'failed' END
    FROM current o
    WHERE o.name NOT IN (SELECT name FROM configured) OR o.name IN (SELECT name FROM outdated)
    ON CONFLICT (blob_key) DO NOTHING
), to_make AS (
    SELECT name, blob_key FROM outdated UNION ALL SELECT name, blob_key FROM missing
), intent AS (
    INSERT INTO intents (user_id, version, purpose, max_attempts, blob_key, variant_keys)
    SELECT t.user_id, t.version, 'add_variants', $4, t.blob_key,
           (SELECT jsonb_object_agg(name, blob_key) FROM to_make)
    FROM target t
    WHERE EXISTS (SELECT 1 FROM to_make)
    RETURNING id, next_attempt_at
)
SELECT (SELECT count(*) FROM target) = 1 AS refreshed,
       (SELECT count(*) FROM current WHERE name NOT IN (SELECT name FROM configured)) AS removed,
       (SELECT count(*) FROM to_make) AS to_make,
       (SELECT count(*) FROM (SELECT pg_notify('profiles_intents', id || ' ' || extract(epoch FROM next_attempt_at))
                               FROM intent) AS n) = 1 AS queued;

-- name: advance_variant_walk
-- After a round that found $3 versions to differ: the pass goes on after $2; or ($2 NULL) it is
-- over, and the next one starts at once if this one found any, else after resting $4 seconds.
UPDATE variant_walks
SET after_user = $2,
    pass_found = CASE WHEN $2::text IS NULL THEN 0 ELSE pass_found + $3 END,
    passes = passes + CASE WHEN $2::text IS NULL THEN 1 ELSE 0 END,
    rests_until = CASE WHEN $2::text IS NULL AND pass_found + $3 = 0 THEN now() + make_interval(secs => $4) END,
    updated_at = now()
WHERE configuration = $1;

-- name: ping
SELECT 1;

-- name: sight_blob_deletions
-- The grace period of a deletion starts when a collector first sees it: only then is the
-- transaction that scheduled it surely committed. clock_timestamp, not now(): it is read after
-- this statement's snapshot, so it is never earlier than that commit.
UPDATE blob_deletions SET seen_at = clock_timestamp()
WHERE state = 'scheduled' AND seen_at IS NULL;

-- name: claim_blob_deletions
-- Takes up to $1 deletions whose grace period ($2 seconds, from their first sighting) is over,
-- leasing them for $3 seconds so that concurrent collectors never take the same one. A blob that
-- is still needed after all (blob_is_needed) is kept, never deleted.
WITH due AS (
    SELECT blob_key FROM blob_deletions
    WHERE state = 'scheduled' AND seen_at <= now() - make_interval(secs => $2)
      AND (leased_until IS NULL OR leased_until <= now())
    ORDER BY seen_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), needed AS (
    SELECT blob_key FROM due WHERE blob_is_needed(blob_key)
), kept AS (
    UPDATE blob_deletions SET state = 'kept', leased_until = NULL, finished_at = now()
    WHERE blob_key IN (SELECT blob_key FROM needed)
)
UPDATE blob_deletions b
SET leased_until = now() + make_interval(secs => $3), attempts = b.attempts + 1
FROM due
WHERE b.blob_key = due.blob_key AND b.blob_key NOT IN (SELECT blob_key FROM needed)
RETURNING b.blob_key, b.reason, b.attempts;

-- name: finish_blob_deletion
UPDATE blob_deletions
SET state = 'deleted', leased_until = NULL, last_error = NULL, finished_at = now()
WHERE blob_key = $1 AND state = 'scheduled';

-- name: fail_blob_deletion
UPDATE blob_deletions
SET leased_until = now() + make_interval(secs => $2), last_error = $3
WHERE blob_key = $1 AND state = 'scheduled';

-- name: classify_blob_keys
-- What the database knows of keys found in the bucket: needed, scheduled for deletion, or named by
-- any version or deletion at all.
SELECT k.key,
       blob_is_needed(k.key) AS needed,
       coalesce(d.state = 'scheduled', false) AS scheduled,
       (d.blob_key IS NOT NULL OR EXISTS (SELECT 1 FROM version_blobs b WHERE b.blob_key = k.key)) AS known
FROM unnest($1::text[]) AS k(key)
LEFT JOIN blob_deletions d ON d.blob_key = k.key;

-- name: schedule_blob_deletion
-- Reconciliation: (re)schedule a key nobody needs; its grace period starts when a collector sees it.
INSERT INTO blob_deletions (blob_key, user_id, version, reason)
SELECT $1, b.user_id, b.version, $2
FROM (SELECT 1) AS one LEFT JOIN version_blobs b ON b.blob_key = $1
ON CONFLICT (blob_key) DO UPDATE
SET state = 'scheduled', reason = EXCLUDED.reason, scheduled_at = now(), seen_at = NULL,
    leased_until = NULL, finished_at = NULL
WHERE blob_deletions.state <> 'scheduled';

-- name: start_maintenance_run
-- True for exactly one caller per interval of $2 seconds, whoever asks first.
INSERT INTO maintenance_runs AS m (task, last_started_at) VALUES ($1, now())
ON CONFLICT (task) DO UPDATE SET last_started_at = now()
WHERE m.last_started_at <= now() - make_interval(secs => $2)
RETURNING true;

-- name: list_intents
-- Filters are optional: state ('stuck' means in_progress with an expired lease), user, minimum
-- age in seconds, one intent id; ($4, $5) is the cursor: (created_at, id) of the last row seen.
SELECT i.id, i.user_id, i.version, v.kind, i.purpose, i.state, i.attempts, i.max_attempts, i.last_error,
       i.created_at, i.updated_at, i.next_attempt_at, i.replays, i.lease_owner,
       (i.state = 'in_progress' AND i.next_attempt_at > now()) AS leased
FROM intents i
JOIN versions v ON v.user_id = i.user_id AND v.version = i.version
WHERE ($1::text IS NULL
       OR ($1 = 'stuck' AND i.state = 'in_progress' AND i.next_attempt_at <= now())
       OR i.state = $1)
  AND ($2::text IS NULL OR i.user_id = $2)
  AND ($3::float8 IS NULL OR i.created_at <= now() - make_interval(secs => $3))
  AND ($4::timestamptz IS NULL OR (i.created_at, i.id) > ($4, $5::uuid))
  AND ($7::uuid IS NULL OR i.id = $7)
ORDER BY i.created_at, i.id
LIMIT $6;

-- name: lock_profile_of_add_variants_intent
-- Replaying add_variants intent $1 makes it unfinished again, which the walk's refresh must see
-- before it queues another intent for the version: both hold the profile's lock, each taking it in
-- a statement of its own, so that the statements after it see what the other committed. Nothing for
-- a publish intent.
SELECT 1 FROM profiles p
WHERE p.user_id = (SELECT i.user_id FROM intents i WHERE i.id = $1 AND i.purpose = 'add_variants')
FOR UPDATE OF p;

-- name: lock_intent_for_replay
-- variant_names: the variants the intent makes (for a publish intent, all of its version's);
-- overtaken: another add_variants intent of the version is in flight (a later configuration's).
SELECT i.id, i.purpose, i.state, i.user_id, i.version,
       (i.state = 'in_progress' AND i.next_attempt_at > now()) AS leased,
       EXISTS (SELECT 1 FROM intents o
               WHERE i.purpose = 'add_variants' AND o.purpose = 'add_variants' AND o.id <> i.id
                 AND o.user_id = i.user_id AND o.version = i.version
                 AND o.state IN ('pending', 'in_progress')) AS overtaken,
       EXISTS (SELECT 1 FROM staged_images s WHERE s.intent_id = i.id) AS staged,
       ARRAY(SELECT jsonb_object_keys(i.variant_keys) ORDER BY 1) AS variant_names
FROM intents i
WHERE i.id = $1
FOR UPDATE;

-- name: give_fresh_key
-- The old keys of a dead intent are scheduled for deletion, so a replay never uploads to them again:
-- intent $1 and its version get the fresh key $2, and its variants the fresh keys $3 ({name: key}),
-- together.
WITH intent AS (
    UPDATE intents SET blob_key = $2, variant_keys = $3 WHERE id = $1
    RETURNING user_id, version
), variants AS (
    UPDATE version_variants w SET blob_key = $3 ->> w.name
    FROM intent i
    WHERE w.user_id = i.user_id AND w.version = i.version
)
UPDATE versions v SET blob_key = $2, state = 'pending'
FROM intent i
WHERE v.user_id = i.user_id AND v.version = i.version;

-- name: give_fresh_variant_keys
-- A dead add_variants intent $1 gives the variants it still makes (rows that still name its keys:
-- a later change of the configuration may have re-keyed them, and those it no longer makes) the
-- fresh keys $2 ({name: key}); its old keys, which it may have uploaded, are scheduled for deletion
-- (its version stays live, so no trigger does it).
WITH intent AS (
    SELECT id, user_id, version, variant_keys FROM intents WHERE id = $1 AND purpose = 'add_variants'
), owned AS (
    SELECT w.user_id, w.version, w.name, w.blob_key
    FROM version_variants w JOIN intent i ON w.user_id = i.user_id AND w.version = i.version
    WHERE w.blob_key = i.variant_keys ->> w.name AND NOT w.verified
), renamed AS (
    UPDATE version_variants w SET blob_key = $2::jsonb ->> w.name
    FROM owned o
    WHERE w.user_id = o.user_id AND w.version = o.version AND w.name = o.name
), rekeyed AS (
    UPDATE intents i
    SET variant_keys = (SELECT coalesce(jsonb_object_agg(o.name, $2::jsonb ->> o.name), '{}') FROM owned o)
    FROM intent WHERE i.id = intent.id
)
INSERT INTO blob_deletions (blob_key, user_id, version, reason)
SELECT blob_key, user_id, version, 'failed' FROM owned
ON CONFLICT (blob_key) DO NOTHING;

-- name: replay_intent
-- The notification wakes the workers, as accept_put's does. The accepting request's traceparent
-- stays; $3 is the replaying request's (or NULL).
UPDATE intents
SET state = 'pending', attempts = 0, max_attempts = $2, next_attempt_at = now(), lease_token = NULL,
    lease_owner = NULL, replays = replays + 1, replay_traceparent = $3, updated_at = now()
WHERE id = $1
RETURNING pg_notify('profiles_intents', id || ' ' || extract(epoch FROM next_attempt_at));

-- name: queue_stats
-- Unfinished and dead intents by state (from their partial indexes), how late the oldest due
-- intent is, and the collector's backlog.
SELECT
    (SELECT count(*) FROM intents WHERE state = 'pending') AS pending,
    (SELECT count(*) FROM intents WHERE state = 'in_progress' AND next_attempt_at > now()) AS in_progress,
    (SELECT count(*) FROM intents WHERE state = 'in_progress' AND next_attempt_at <= now()) AS stuck,
    (SELECT count(*) FROM intents WHERE state = 'dead') AS dead,
    (SELECT count(*) FROM intents
     WHERE purpose = 'add_variants' AND state IN ('pending', 'in_progress')) AS adding_variants,
    (SELECT coalesce(extract(epoch FROM now() - min(next_attempt_at)), 0)
     FROM intents WHERE state IN ('pending', 'in_progress') AND next_attempt_at <= now()) AS lag_seconds,
    (SELECT count(*) FROM blob_deletions WHERE state = 'scheduled') AS gc_scheduled,
    (SELECT count(*) FROM blob_deletions
     WHERE state = 'scheduled' AND seen_at <= now() - make_interval(secs => $1)) AS gc_due;

-- name: prune_finished_intents
-- Small batches keep each delete short; staged bytes go with their intent (ON DELETE CASCADE).
-- The outer WHERE repeats the condition: a row replayed while the DELETE waited for its lock is
-- re-checked as it is now, and kept.
DELETE FROM intents WHERE id IN (
    SELECT id FROM intents
    WHERE state IN ('done', 'superseded') AND updated_at < now() - make_interval(secs => $1)
    LIMIT $2
) AND state IN ('done', 'superseded') AND updated_at < now() - make_interval(secs => $1);

-- name: prune_dead_intents
-- A dead add_variants intent takes the rows still naming its keys (never attached) with it: the
-- walk finds them missing and queues them again; their keys (maybe uploaded) are scheduled. Rows
-- are locked first and re-checked: one replayed while this waited is kept.
WITH doomed AS (
    SELECT id, user_id, version, purpose, variant_keys FROM intents
    WHERE state = 'dead' AND updated_at < now() - make_interval(secs => $1)
    LIMIT $2
    FOR UPDATE
), unmade AS (
    DELETE FROM version_variants w USING doomed d
    WHERE d.purpose = 'add_variants' AND w.user_id = d.user_id AND w.version = d.version
      AND w.blob_key = d.variant_keys ->> w.name AND NOT w.verified
    RETURNING w.blob_key, w.user_id, w.version
), retired AS (
    INSERT INTO blob_deletions (blob_key, user_id, version, reason)
    SELECT blob_key, user_id, version, 'failed' FROM unmade
    ON CONFLICT (blob_key) DO NOTHING
)
DELETE FROM intents WHERE id IN (SELECT id FROM doomed);

-- name: prune_idempotency_keys
DELETE FROM idempotency_keys WHERE (user_id, key) IN (
    SELECT user_id, key FROM idempotency_keys
    WHERE created_at < now() - make_interval(secs => $1)
    LIMIT $2
);

-- name: prune_blob_deletions
DELETE FROM blob_deletions WHERE blob_key IN (
    SELECT blob_key FROM blob_deletions
    WHERE state <> 'scheduled' AND finished_at < now() - make_interval(secs => $1)
    LIMIT $2
) AND state <> 'scheduled' AND finished_at < now() - make_interval(secs => $1);

-- name: prune_replay_jobs
-- Finished bulk replays go after the retention of finished intents, their per-intent report with them.
DELETE FROM replay_jobs WHERE id IN (
    SELECT id FROM replay_jobs
    WHERE state = 'done' AND finished_at < now() - make_interval(secs => $1)
    LIMIT $2
);

-- name: prune_console_sessions
-- Console sessions that ended (signed-out ones are already gone).
DELETE FROM console_sessions WHERE id_sha256 IN (
    SELECT id_sha256 FROM console_sessions
    WHERE expires_at < now() - make_interval(secs => $1)
    LIMIT $2
);

-- name: record_maintenance_report
-- What a run of task $1, started at $2, found ($3); a run that nobody announced (an operator's
-- `profiles gc --reconcile`) leaves its start too.
INSERT INTO maintenance_runs AS m (task, last_started_at, last_finished_at, last_report)
VALUES ($1, $2, now(), $3)
ON CONFLICT (task) DO UPDATE SET last_finished_at = now(), last_report = EXCLUDED.last_report;

-- name: console_overview
-- What the console's overview adds to queue_stats: the oldest due intent, failing deletions, the
-- last reconciliation and intents finished in the last hour (from their partial index).
SELECT o.id AS oldest_due_id, o.next_attempt_at AS oldest_due_at,
       (SELECT count(*) FROM blob_deletions WHERE state = 'scheduled' AND last_error IS NOT NULL) AS gc_failing,
       r.last_started_at AS reconcile_started_at, r.last_finished_at AS reconcile_finished_at,
       r.last_report AS reconcile_report
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT id, next_attempt_at FROM intents
    WHERE state IN ('pending', 'in_progress') AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT 1
) AS o ON true
LEFT JOIN maintenance_runs r ON r.task = 'reconcile';

-- name: finished_per_minute
-- Writes finished in each of the last 60 minutes (0 = the current one), published or superseded
-- (add_variants intents publish nothing).
SELECT floor(extract(epoch FROM now() - updated_at) / 60)::int AS minutes_ago,
       count(*) FILTER (WHERE state = 'done') AS done,
       count(*) FILTER (WHERE state = 'superseded') AS superseded
FROM intents
WHERE state IN ('done', 'superseded') AND purpose = 'publish' AND updated_at > now() - interval '60 minutes'
GROUP BY 1;

-- name: intent_storage
-- Where an intent's image is: the key it uploads to, its staged bytes (their size, without
-- reading them) and its version's state.
SELECT i.blob_key, octet_length(s.data) AS staged_bytes, v.state AS version_state, v.sha256,
       v.content_type, v.width, v.height
FROM intents i
JOIN versions v ON v.user_id = i.user_id AND v.version = i.version
LEFT JOIN staged_images s ON s.intent_id = i.id
WHERE i.id = $1;

-- name: get_profile_row
SELECT user_id, newest_version, live_version, deleted, created_at, updated_at
FROM profiles
WHERE user_id = $1;

-- name: profile_versions
-- The newest $2 versions of a user, each with its intent (if not pruned), its blob's deletion, its
-- variants (made or not) and its newest add_variants intent.
SELECT v.version, v.kind, v.state, v.metadata, v.blob_key, v.size, v.content_type, v.width, v.height,
       v.created_at, v.published_at, i.id AS intent_id, i.state AS intent_state, d.state AS deletion_state,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                    'name', w.name, 'box', w.box, 'verified', w.verified, 'width', w.width,
                    'height', w.height, 'size', w.size) ORDER BY w.box, w.name), '[]')
        FROM version_variants w WHERE w.user_id = v.user_id AND w.version = v.version) AS variants,
       a.id AS adding_intent_id, a.state AS adding_intent_state
FROM versions v
LEFT JOIN intents i ON i.user_id = v.user_id AND i.version = v.version AND i.purpose = 'publish'
LEFT JOIN blob_deletions d ON d.blob_key = v.blob_key
LEFT JOIN LATERAL (
    SELECT id, state FROM intents
    WHERE user_id = v.user_id AND version = v.version AND purpose = 'add_variants'
    ORDER BY created_at DESC
    LIMIT 1
) AS a ON true
WHERE v.user_id = $1
ORDER BY v.version DESC
LIMIT $2;

-- name: submit_replay_job
-- A second submission of the same form ($1) finds the first job; the no-op update makes RETURNING
-- answer it, and same_filter says whether it asked for the same intents (a token sent again with
-- another filter is refused by the caller). The notification wakes the workers' job runners.
INSERT INTO replay_jobs AS j (token, selection, user_id, older_than_seconds, requested_by)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (token) DO UPDATE SET token = j.token
RETURNING j.id, (j.selection, j.user_id, j.older_than_seconds) IS NOT DISTINCT FROM ($2, $3, $4) AS same_filter,
          pg_notify('profiles_replay_jobs', j.id::text);

-- name: claim_replay_job
-- The oldest unfinished job whose lease is free, leased to $1 for $2 seconds.
WITH free AS (
    SELECT id FROM replay_jobs
    WHERE state <> 'done' AND (leased_until IS NULL OR leased_until <= now())
    ORDER BY created_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE replay_jobs j
SET lease_token = gen_random_uuid(), lease_owner = $1, leased_until = now() + make_interval(secs => $2),
    started_at = coalesce(j.started_at, now())
FROM free
WHERE j.id = free.id
RETURNING j.id, j.state, j.selection, j.user_id, j.older_than_seconds, j.lease_token;

-- name: start_replay_job
-- Fenced by the lease ($2): the intents job $1 will replay, in order ($3), and its total.
WITH job AS (
    UPDATE replay_jobs SET state = 'running', total = cardinality($3::uuid[])
    WHERE id = $1 AND lease_token = $2 AND state = 'queued'
    RETURNING id
), listed AS (
    INSERT INTO replay_job_intents (job_id, intent_id, position)
    SELECT job.id, t.intent_id, t.position
    FROM job, unnest($3::uuid[]) WITH ORDINALITY AS t(intent_id, position)
)
SELECT count(*) = 1 FROM job;

-- name: next_replay_job_intents
SELECT intent_id FROM replay_job_intents
WHERE job_id = $1 AND outcome IS NULL
ORDER BY position
LIMIT $2;

-- name: record_replay_outcome
-- In the replay's own transaction, fenced: only the lease holder ($2) records, once per intent, so
-- a replay whose record fails is rolled back with it. FOR SHARE: a worker taking the lease over
-- waits for this transaction, and this one sees a takeover that committed first.
WITH job AS (
    SELECT id FROM replay_jobs WHERE id = $1 AND lease_token = $2 AND state = 'running' FOR SHARE
)
UPDATE replay_job_intents r SET outcome = $4
FROM job
WHERE r.job_id = job.id AND r.intent_id = $3 AND r.outcome IS NULL
RETURNING true;

-- name: renew_replay_job
UPDATE replay_jobs SET leased_until = now() + make_interval(secs => $3)
WHERE id = $1 AND lease_token = $2 AND state = 'running'
RETURNING true;

-- name: finish_replay_job
UPDATE replay_jobs
SET state = 'done', finished_at = now(), lease_token = NULL, lease_owner = NULL, leased_until = NULL
WHERE id = $1 AND lease_token = $2 AND state = 'running'
  AND NOT EXISTS (SELECT 1 FROM replay_job_intents r WHERE r.job_id = $1 AND r.outcome IS NULL);

-- name: list_replay_jobs
-- Jobs newest first: one ($1), or the newest $2; with how many intents each has dealt with.
SELECT j.id, j.selection, j.user_id, j.older_than_seconds, j.requested_by, j.state, j.total,
       j.created_at, j.started_at, j.finished_at,
       (SELECT count(*) FROM replay_job_intents r WHERE r.job_id = j.id AND r.outcome IS NOT NULL) AS processed
FROM replay_jobs j
WHERE $1::uuid IS NULL OR j.id = $1
ORDER BY j.created_at DESC
LIMIT $2;

-- name: replay_job_outcomes
SELECT outcome, count(*) AS count FROM replay_job_intents
WHERE job_id = $1 AND outcome IS NOT NULL
GROUP BY outcome;

-- name: replay_job_intents_with
-- The first $3 intents of job $1 whose outcome is one of $2, in the job's order.
SELECT r.intent_id, r.outcome, i.user_id, i.version, i.state
FROM replay_job_intents r
LEFT JOIN intents i ON i.id = r.intent_id
WHERE r.job_id = $1 AND r.outcome = ANY ($2::text[])
ORDER BY r.position
LIMIT $3;

-- name: start_console_session
-- A signed-in console session ($1: the SHA-256 of its id), ending after $4 seconds or at the
-- token's exp ($5, seconds since the epoch), whichever is sooner.
INSERT INTO console_sessions (id_sha256, subject, csrf, expires_at)
VALUES ($1, $2, $3, least(now() + make_interval(secs => $4), to_timestamp($5)))
RETURNING extract(epoch FROM expires_at)::float8 AS expires_at;

-- name: get_console_session
SELECT subject, csrf, extract(epoch FROM expires_at)::float8 AS expires_at
FROM console_sessions
WHERE id_sha256 = $1 AND expires_at > now();

-- name: end_console_session
DELETE FROM console_sessions WHERE id_sha256 = $1;
