-- The payload fingerprint of each event: SHA-256 of its canonical JSON (or
-- what an encrypting wrapper set instead), computed by the core when the
-- event is appended. An append whose event ids are already stored compares
-- fingerprints to tell an identical retry from a reused id, without reading
-- or decoding the stored payloads. Rows written before this migration have
-- none (NULL) and are compared by payload.
ALTER TABLE events ADD COLUMN data_digest BLOB;
