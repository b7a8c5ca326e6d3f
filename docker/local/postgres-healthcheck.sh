#!/bin/sh
# The local compose file's health check (docker-compose.cpu.yml). A script, not an inline command: podman-compose
# leaves `${...}` inside an `!override` tag uninterpolated, so the port comes from the container's environment.
exec pg_isready -q -h 127.0.0.1 -p "${PGPORT:-5432}" -U "$POSTGRES_USER" -d "$POSTGRES_DB"
