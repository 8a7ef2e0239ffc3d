-- migrate:up

-- A version's variants (resized, metadata-free copies of its image), one row each. The keys are
-- chosen and committed with the version, before any byte is uploaded; the measurements are written
-- by the fenced publish that makes the version live together with all of them (verified).
CREATE TABLE version_variants (
    user_id      text    NOT NULL,
    version      bigint  NOT NULL,
    name         text    NOT NULL,
    box          integer NOT NULL CHECK (box > 0),
    blob_key     text    NOT NULL UNIQUE,
    content_type text    NOT NULL,
    width        integer,
    height       integer,
    size         integer,
    sha256       text,
    verified     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (user_id, version, name),
    FOREIGN KEY (user_id, version) REFERENCES versions (user_id, version),
    CONSTRAINT verified_is_measured CHECK (
        verified = (width IS NOT NULL AND height IS NOT NULL AND size IS NOT NULL AND sha256 IS NOT NULL)
    )
);

-- The variant keys an intent uploads to, {name: key}: on the intent row, which the claim locks, for
-- the same reason as intents.blob_key (a replay gives them fresh keys together).
ALTER TABLE intents ADD COLUMN variant_keys jsonb NOT NULL DEFAULT '{}';

-- Every blob a version names: its image and its variants. The one place that says so, for
-- blob_is_needed, reconciliation and the retire triggers.
CREATE VIEW version_blobs AS
    SELECT user_id, version, blob_key FROM versions WHERE blob_key IS NOT NULL
    UNION ALL
    SELECT user_id, version, blob_key FROM version_variants;

-- A version's measured variants as the reads serve them: only measured ones, all of them for a version
-- published with them (get_live_version, get_published_version).
CREATE FUNCTION measured_variants(owner text, number bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'name', w.name, 'blob_key', w.blob_key, 'sha256', w.sha256, 'size', w.size,
               'content_type', w.content_type, 'width', w.width, 'height', w.height) ORDER BY w.box), '[]')
    FROM version_variants w
    WHERE w.user_id = owner AND w.version = number AND w.verified
$$;

CREATE OR REPLACE FUNCTION blob_is_needed(key text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1
        FROM version_blobs b
        JOIN versions v ON v.user_id = b.user_id AND v.version = b.version
        JOIN profiles p ON p.user_id = v.user_id
        WHERE b.blob_key = key AND (v.state = 'pending' OR p.live_version = v.version)
    )
$$;

CREATE OR REPLACE FUNCTION retire_unpublished_blob() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO blob_deletions (blob_key, user_id, version, reason)
    SELECT b.blob_key, b.user_id, b.version, NEW.state
    FROM version_blobs b
    WHERE b.user_id = NEW.user_id AND b.version = NEW.version
    ON CONFLICT (blob_key) DO NOTHING;
    RETURN NULL;
END
$$;

-- As before, the keys are read as committed now (FOR SHARE), the variants' as the image's: a replay
-- may have given them all fresh keys meanwhile.
CREATE OR REPLACE FUNCTION retire_replaced_blob() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    reason text := CASE WHEN NEW.deleted THEN 'deleted' ELSE 'replaced' END;
BEGIN
    INSERT INTO blob_deletions (blob_key, user_id, version, reason)
    SELECT v.blob_key, v.user_id, v.version, reason
    FROM versions v
    WHERE v.user_id = OLD.user_id AND v.version = OLD.live_version AND v.kind = 'put'
    FOR SHARE OF v
    ON CONFLICT (blob_key) DO NOTHING;
    INSERT INTO blob_deletions (blob_key, user_id, version, reason)
    SELECT w.blob_key, w.user_id, w.version, reason
    FROM version_variants w
    WHERE w.user_id = OLD.user_id AND w.version = OLD.live_version
    FOR SHARE OF w
    ON CONFLICT (blob_key) DO NOTHING;
    RETURN NULL;
END
$$;

-- migrate:down

CREATE OR REPLACE FUNCTION retire_replaced_blob() RETURNS trigger
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

CREATE OR REPLACE FUNCTION retire_unpublished_blob() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO blob_deletions (blob_key, user_id, version, reason)
    VALUES (NEW.blob_key, NEW.user_id, NEW.version, NEW.state)
    ON CONFLICT (blob_key) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION blob_is_needed(key text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1
        FROM versions v JOIN profiles p ON p.user_id = v.user_id
        WHERE v.blob_key = key AND (v.state = 'pending' OR p.live_version = v.version)
    )
$$;

-- Variant blobs are no longer known after this: reconciliation of the release before schedules
-- them as strays, and collects them after the grace period.
DROP FUNCTION measured_variants(text, bigint);
DROP VIEW version_blobs;
ALTER TABLE intents DROP COLUMN variant_keys;
DROP TABLE version_variants;
