-- What a proxy needs beyond reading (roles.sql's default privileges): run after each `gateway migrate`, as
-- gateway_migrate (the tables' owner) or a superuser, in the gateway's database. It is safe to run again.
--
--   psql "$MIGRATE_URL" -v ON_ERROR_STOP=1 -f deploy/postgres/grants.sql
--
-- A proxy delivers the outbox to Redis when it holds the delivery lock (any process that is up does, so a
-- stale Redis entry cannot outlive a stopped admin process): it deletes the rows it delivered. It writes a
-- token's last-used time and address when it records usage in the store itself; it can change nothing else
-- of a token (status, secret, access level), and it cannot read the audit log. It keeps reading admin keys
-- (their argon2id hashes only) for one reason: a proxy's private metrics port (metrics_listen with
-- metrics_public = false) asks for an admin key; with metrics off or public, revoke that too.
\set ON_ERROR_STOP 1

GRANT DELETE ON token_changes TO gateway_proxy;
GRANT UPDATE (last_used_at, last_used_ip) ON tokens TO gateway_proxy;
REVOKE SELECT ON audit_events FROM gateway_proxy;
