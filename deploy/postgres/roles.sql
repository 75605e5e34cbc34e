-- The gateway's database roles, least privilege for each kind of process. Run once, as a superuser (or the
-- database's owner), in the gateway's database, BEFORE the first `gateway migrate`:
--
--   psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -v migrate_password=... -v admin_password=... \
--        -v proxy_password=... -f deploy/postgres/roles.sql
--
--   gateway_migrate  runs `gateway migrate`: owns the schema's tables (DDL), nothing else runs as it
--   gateway_admin    runs `gateway admin`: reads and writes tokens, audit, admin keys and the outbox
--   gateway_proxy    runs `gateway proxy`: reads tokens; LISTENs (no grant needed); delivers the outbox
--                    to Redis (reads and deletes its rows); writes last-used times (two columns only)
--
-- Default privileges give the admin and proxy roles what they need on every table a migration creates, so
-- an upgrade needs no new grant here; the few column- and table-level grants of grants.sql follow each
-- `gateway migrate`.
\set ON_ERROR_STOP 1

CREATE ROLE gateway_migrate LOGIN PASSWORD :'migrate_password';
CREATE ROLE gateway_admin LOGIN PASSWORD :'admin_password';
CREATE ROLE gateway_proxy LOGIN PASSWORD :'proxy_password';

-- PostgreSQL 15 and later no longer let every role create tables in the public schema.
GRANT USAGE, CREATE ON SCHEMA public TO gateway_migrate;
GRANT USAGE ON SCHEMA public TO gateway_admin, gateway_proxy;

ALTER DEFAULT PRIVILEGES FOR ROLE gateway_migrate IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO gateway_admin;
ALTER DEFAULT PRIVILEGES FOR ROLE gateway_migrate IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO gateway_admin;
ALTER DEFAULT PRIVILEGES FOR ROLE gateway_migrate IN SCHEMA public
    GRANT SELECT ON TABLES TO gateway_proxy;
