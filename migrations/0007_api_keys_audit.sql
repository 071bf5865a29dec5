-- API keys, the append-only audit log and stored Idempotency-Key responses (SPEC §8, issue 7).

-- A key is `mf_<key_id>_<secret>`; only SHA-256 of the whole key is stored (the secret is ≥ 128 random bits,
-- so a fast hash is right: nothing to brute-force). Revoked keys stay, for the audit trail.
CREATE TABLE api_keys (
    key_id      text        NOT NULL,
    key_hash    bytea       NOT NULL,
    role        text        NOT NULL,
    customer_id text,
    name        text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CONSTRAINT api_keys_pkey PRIMARY KEY (key_id),
    CONSTRAINT api_keys_role_known CHECK (role IN ('ingest', 'read', 'admin')),
    CONSTRAINT api_keys_hash_sha256 CHECK (octet_length(key_hash) = 32),
    CONSTRAINT api_keys_customer_valid CHECK (customer_id IS NULL OR customer_id ~ '^[A-Za-z0-9._:-]{1,128}$')
);

-- Who did what, when: the key id (or 'auth-off' when auth is disabled, 'cli' for the command line), the
-- action, the entity and its state before and after. Nothing may change or remove a row: a trigger refuses
-- UPDATE, DELETE and TRUNCATE, and the owning role (the application's) gives up those privileges.
CREATE TABLE audit_log (
    id         bigint      GENERATED ALWAYS AS IDENTITY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text        NOT NULL,
    action     text        NOT NULL,
    entity     text        NOT NULL,
    entity_id  text        NOT NULL,
    before     jsonb,
    after      jsonb,
    request_id text,
    CONSTRAINT audit_log_pkey PRIMARY KEY (id)
);

CREATE INDEX audit_log_entity_idx ON audit_log (entity, entity_id, at);

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM CURRENT_USER;

-- Responses to admin POSTs sent with an Idempotency-Key, per key id: the same key and body get the stored
-- response again; the same key with another body is refused. `status` is NULL while the first request runs.
CREATE TABLE idempotency_keys (
    scope        text        NOT NULL,
    idem_key     text        NOT NULL,
    route        text        NOT NULL,
    request_hash bytea       NOT NULL,
    status       integer,
    content_type text,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (scope, idem_key)
);
