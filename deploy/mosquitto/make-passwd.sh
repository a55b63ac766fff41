#!/bin/sh
# Make the broker's static accounts from environment variables, then run the
# given command. In $MOSQUITTO_CONFIG_DIR:
#
#   static-services.passwd  svc.ingest and svc.healthcheck (the services'
#                           listener, 1884)
#   static-services.acl     a copy of services.acl beside this script (made by
#                           `compression devices broker-config`)
#   static-devices.passwd   the optional demo garment (the device listeners,
#   static-devices.acl      1883 and 8883) and its ACL block: its three topics
#
# entrypoint.sh (the mosquitto service's entry point in docker-compose.yml)
# runs it at every start of the container, so no secret is ever committed, and
# merges these files with the ones the device registry writes
# (devices.passwd, devices.acl, services.passwd, services.acl) into the files
# that mosquitto.conf names:
#
#   MQTT_INGEST_PASSWORD       required: the ingester's account, svc.ingest.
#                              Only A-Z a-z 0-9 . _ ~ - (it goes into the
#                              ingester's mqtt:// URL unencoded).
#   MQTT_DEMO_DEVICE_ID        optional: a garment account for trying the
#   MQTT_DEMO_DEVICE_PASSWORD  platform out; both or neither. Like every
#                              garment it logs in on a device listener, its
#                              client id is its id, and it may publish only
#                              garments/v1/<id>/telemetry, /event and /status.
#
# The account svc.healthcheck gets a random password, kept in
# $MOSQUITTO_CONFIG_DIR/healthcheck-password (mode 0600) for the health check;
# a rerun keeps the password of that file, so the health check does not fail
# between the rerun and the reload.
#
# After changing the ACL of a running broker (a changed .env reaches the
# container only when it is recreated: docker compose up -d mosquitto):
#   docker compose exec mosquitto sh /deploy/make-passwd.sh
# entrypoint.sh's watcher notices the new files within seconds, merges them
# with the registry's and sends the broker SIGHUP.
#
# Files are written to temporary names and renamed into place, so that a
# reader never sees half a file; as root they are given to the mosquitto
# user with mode 0600 (mosquitto >= 2.0.16 warns about any other owner or mode).
# Note: mosquitto_passwd -b takes the password as an argument, visible to the
# processes of this container for the instant it runs.
set -eu

config_dir=${MOSQUITTO_CONFIG_DIR:-/mosquitto/config}
deploy_dir=${MOSQUITTO_DEPLOY_DIR:-$(dirname "$0")}
ingest_user=svc.ingest
health_user=svc.healthcheck
# The device listeners' mount point (devices/registry/broker.py, MOUNT_POINT) and the protocol's topic root.
device_topics=fleet/garments/v1

fail() {
    echo "make-passwd.sh: $*" >&2
    exit 1
}

ingest_password=${MQTT_INGEST_PASSWORD:-}
[ -n "$ingest_password" ] || fail "MQTT_INGEST_PASSWORD is not set (set it in .env)"
case $ingest_password in
    *[!A-Za-z0-9._~-]*) fail "MQTT_INGEST_PASSWORD may use only A-Z a-z 0-9 . _ ~ - (it is part of a URL)" ;;
esac

device_id=${MQTT_DEMO_DEVICE_ID:-}
device_password=${MQTT_DEMO_DEVICE_PASSWORD:-}
if [ -n "$device_id" ] || [ -n "$device_password" ]; then
    if [ -z "$device_id" ] || [ -z "$device_password" ]; then
        fail "set both MQTT_DEMO_DEVICE_ID and MQTT_DEMO_DEVICE_PASSWORD, or neither"
    fi
    # The device-id rule of protocol v1, ^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$, checked
    # without grep: grep matches line by line and would let "sock-0001<newline>" pass.
    case $device_id in
        [!A-Za-z0-9]* | *[!A-Za-z0-9_-]*) fail "MQTT_DEMO_DEVICE_ID '$device_id' is not a valid device id" ;;
    esac
    if [ "${#device_id}" -lt 3 ] || [ "${#device_id}" -gt 64 ]; then
        fail "MQTT_DEMO_DEVICE_ID '$device_id' is not a valid device id (3 to 64 characters)"
    fi
fi

mkdir -p "$config_dir"
umask 077

# Give a finished file its owner and mode, then move it into place atomically.
install_file() {
    if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
        chown mosquitto:mosquitto "$1"
    fi
    chmod 0600 "$1"
    mv -f "$1" "$2"
}

health_password=$(cat "$config_dir/healthcheck-password" 2>/dev/null || true)
case $health_password in
    "" | *[!0-9a-f]*) health_password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n') ;;
esac

services_passwd_tmp=$(mktemp "$config_dir/.static-services.passwd.XXXXXX")
services_acl_tmp=$(mktemp "$config_dir/.static-services.acl.XXXXXX")
devices_passwd_tmp=$(mktemp "$config_dir/.static-devices.passwd.XXXXXX")
devices_acl_tmp=$(mktemp "$config_dir/.static-devices.acl.XXXXXX")
health_tmp=$(mktemp "$config_dir/.healthcheck-password.XXXXXX")
trap 'rm -f "$services_passwd_tmp" "$services_acl_tmp" "$devices_passwd_tmp" "$devices_acl_tmp" "$health_tmp"' EXIT

mosquitto_passwd -b "$services_passwd_tmp" "$ingest_user" "$ingest_password"
mosquitto_passwd -b "$services_passwd_tmp" "$health_user" "$health_password"
cp "$deploy_dir/services.acl" "$services_acl_tmp"
echo "# Written by make-passwd.sh: the demo garment MQTT_DEMO_DEVICE_ID, if set." >"$devices_acl_tmp"
if [ -n "$device_id" ]; then
    mosquitto_passwd -b "$devices_passwd_tmp" "$device_id" "$device_password"
    # The block devices/registry/broker.py writes for a registered garment (tests/unit/test_deploy_files.py).
    {
        echo
        echo "# garment $device_id: its telemetry, events and status"
        echo "user $device_id"
        for channel in telemetry event status; do
            echo "topic write $device_topics/$device_id/$channel"
        done
    } >>"$devices_acl_tmp"
fi
printf '%s\n' "$health_password" >"$health_tmp"

install_file "$health_tmp" "$config_dir/healthcheck-password"
install_file "$services_acl_tmp" "$config_dir/static-services.acl"
install_file "$devices_acl_tmp" "$config_dir/static-devices.acl"
install_file "$services_passwd_tmp" "$config_dir/static-services.passwd"
install_file "$devices_passwd_tmp" "$config_dir/static-devices.passwd"
trap - EXIT

echo "make-passwd.sh: $config_dir/static-services.passwd has ${ingest_user} and ${health_user}${device_id:+; static-devices.passwd has $device_id}"

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
