-- Bumped (on the parent's row) by every child stream creation. An append that chained its
-- records onto a cached head commits only if the head *and* this version are unchanged, so a
-- record can never take the name of a child stream created concurrently (see `append_chained`).
ALTER TABLE streams ADD COLUMN child_version BIGINT NOT NULL DEFAULT 0;
