-- WebPods schema (PostgreSQL). Timestamps are epoch milliseconds.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE identities (
    provider    TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    email       TEXT,
    name        TEXT,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (provider, provider_id)
);
CREATE INDEX identities_user ON identities (user_id);

CREATE TABLE pods (
    id         BIGSERIAL PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    -- Denormalised from the latest record of `.config/owner`, updated in the same transaction.
    owner_id   TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX pods_owner ON pods (owner_id);

CREATE TABLE streams (
    id             BIGSERIAL PRIMARY KEY,
    pod_id         BIGINT NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
    parent_id      BIGINT REFERENCES streams (id) ON DELETE CASCADE,
    path           TEXT NOT NULL,
    name           TEXT NOT NULL,
    access         TEXT NOT NULL,
    creator_id     TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    -- The committed chain head: -1 / NULL while the stream is empty.
    head_index     BIGINT NOT NULL DEFAULT -1,
    head_hash      TEXT,
    head_timestamp BIGINT NOT NULL DEFAULT 0,
    UNIQUE (pod_id, path)
);
CREATE INDEX streams_parent ON streams (parent_id, name);

-- No foreign key to streams: a per-row check would cost every batch insert; stream deletion
-- removes records explicitly in the same transaction.
CREATE TABLE records (
    stream_id     BIGINT NOT NULL,
    idx           BIGINT NOT NULL,
    name          TEXT NOT NULL,
    content       BYTEA NOT NULL,
    content_type  TEXT NOT NULL,
    headers       TEXT NOT NULL,
    size          BIGINT NOT NULL,
    author        TEXT NOT NULL,
    ts            BIGINT NOT NULL,
    content_hash  TEXT NOT NULL,
    hash          TEXT NOT NULL,
    previous_hash TEXT,
    deleted       BOOLEAN NOT NULL,
    purged        BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (stream_id, idx)
);
CREATE INDEX records_by_name ON records (stream_id, name, idx);

CREATE TABLE idempotency_keys (
    stream_id   BIGINT NOT NULL,
    key         TEXT NOT NULL,
    first_index BIGINT NOT NULL,
    count       INTEGER NOT NULL,
    PRIMARY KEY (stream_id, key)
);
