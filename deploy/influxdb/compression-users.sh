#!/bin/bash
# InfluxDB users of the monitor and of Grafana (docker-compose.yml mounts this
# folder at /docker-entrypoint-initdb.d of the influxdb:1.8 image).
#
# On the first start (an empty volume) the image's init-influxdb.sh creates
# the database, the admin and the ingester's user (INFLUXDB_USER), then
# sources this file with $INFLUX_CMD logged in as the admin. It adds:
#
#   INFLUXDB_MONITOR_USER  read and write on the database (ALL ON it): the
#                          monitor reads the telemetry and writes its flags
#                          (flag_day, flag_episode, registry_problem).
#   INFLUXDB_GRAFANA_USER  read only (READ ON it): the dashboards.
#
# Idempotent, and runnable by hand on a volume made before these users existed:
#   docker compose exec influxdb bash /docker-entrypoint-initdb.d/compression-users.sh
# Passwords: no quotes and no backslashes (they go into InfluxQL strings).
# No "set -u": init-influxdb.sh sources this file and goes on after it.
set -e

if [ -z "${INFLUX_CMD:-}" ]; then
    INFLUX_CMD="influx -host 127.0.0.1 -port 8086 -username ${INFLUXDB_ADMIN_USER} -password ${INFLUXDB_ADMIN_PASSWORD} -execute "
fi

compression_user() {  # name password privilege
    case $1$2 in
        *[\'\"\\]*) echo "compression-users.sh: user $1: no quotes or backslashes in names and passwords" >&2; return 1 ;;
    esac
    # CREATE USER fails if the user exists with another password; SET PASSWORD makes it the given one.
    $INFLUX_CMD "CREATE USER \"$1\" WITH PASSWORD '$2'" >/dev/null 2>&1 || true
    $INFLUX_CMD "SET PASSWORD FOR \"$1\" = '$2'"
    $INFLUX_CMD "GRANT $3 ON \"$INFLUXDB_DB\" TO \"$1\""
    echo "compression-users.sh: $1 has $3 on $INFLUXDB_DB"
}

compression_user "${INFLUXDB_MONITOR_USER:?}" "${INFLUXDB_MONITOR_PASSWORD:?}" ALL
compression_user "${INFLUXDB_GRAFANA_USER:?}" "${INFLUXDB_GRAFANA_PASSWORD:?}" READ
