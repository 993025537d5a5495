-- GDPR crypto-shredding (annals::gdpr): one wrapped data key per subject,
-- and the erasure log. A forgotten subject's row is deleted from
-- subject_keys; the log names subjects only by a SHA-256 (no personal data).
CREATE TABLE subject_keys (
    subject       TEXT    PRIMARY KEY,
    master_key_id TEXT    NOT NULL,      -- id (hash) of the wrapping master key
    wrapped_key   BLOB    NOT NULL,      -- nonce || AES-256-GCM(data key)
    created_at    INTEGER NOT NULL       -- microseconds since the epoch, UTC
) WITHOUT ROWID;

CREATE TABLE erasure_log (
    id           INTEGER PRIMARY KEY,
    subject_hash TEXT    NOT NULL,
    erased_at    INTEGER NOT NULL,       -- microseconds since the epoch, UTC
    erased_by    TEXT    NOT NULL
);
CREATE INDEX erasure_log_subject ON erasure_log (subject_hash);
