-- Login sessions, OAuth login states (PKCE) and rate-limit counters (SPEC §3.2, §9).
CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE oauth_states (
    state      TEXT PRIMARY KEY,
    provider   TEXT NOT NULL,
    verifier   TEXT NOT NULL,
    redirect   TEXT,
    expires_at BIGINT NOT NULL
);

-- One row per caller, action and one-minute slice; a sliding hour sums the last 60 slices.
CREATE TABLE rate_counts (
    caller TEXT NOT NULL,
    action TEXT NOT NULL,
    slice  BIGINT NOT NULL,
    count  BIGINT NOT NULL,
    PRIMARY KEY (caller, action, slice)
);
