-- Custom domains (SPEC §4.5): a domain serves at most one pod.
CREATE TABLE domains (
    domain TEXT PRIMARY KEY,
    pod_id BIGINT NOT NULL REFERENCES pods (id) ON DELETE CASCADE
);
CREATE INDEX domains_pod ON domains (pod_id);
