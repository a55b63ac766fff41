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
# and the retention policies (docs/schema.md): "forever" (infinite) for the
# monitor's day summaries and flags, and the raw samples' default policy
# kept COMPRESSION_MONITOR_RAW_RETENTION_DAYS days (396; 0: for ever). The
# monitor sets the same at its start when its user may.
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

$INFLUX_CMD "CREATE RETENTION POLICY \"forever\" ON \"$INFLUXDB_DB\" DURATION INF REPLICATION 1"
raw_days="${COMPRESSION_MONITOR_RAW_RETENTION_DAYS:-396}"
case $raw_days in
    0) raw_duration=INF ;;
    *[!0-9]*) echo "compression-users.sh: COMPRESSION_MONITOR_RAW_RETENTION_DAYS must be a number of days" >&2; return 1 ;;
    *) raw_duration="${raw_days}d" ;;
esac
$INFLUX_CMD "ALTER RETENTION POLICY \"autogen\" ON \"$INFLUXDB_DB\" DURATION $raw_duration"
echo "compression-users.sh: raw samples kept $raw_duration, summaries and flags for ever"
