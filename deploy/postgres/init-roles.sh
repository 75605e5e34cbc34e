#!/bin/sh
# Run by the postgres image on its first start (from /docker-entrypoint-initdb.d): the gateway's roles, with
# the passwords compose.yaml passes in. Elsewhere, run roles.sql with psql yourself (see its first lines).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v migrate_password="$MIGRATE_DB_PASSWORD" \
  -v admin_password="$ADMIN_DB_PASSWORD" \
  -v proxy_password="$PROXY_DB_PASSWORD" \
  -f /gateway/roles.sql
