#!/bin/sh
# Entry point of the mosquitto service (docker-compose.yml):
#
#   entrypoint.sh COMMAND...   e.g. /docker-entrypoint.sh /usr/sbin/mosquitto -c /deploy/mosquitto.conf
#
# 1. make-passwd.sh writes the static accounts from the environment into
#    $MOSQUITTO_CONFIG_DIR: static-services.passwd and .acl (svc.ingest,
#    svc.healthcheck) and static-devices.passwd and .acl (the optional demo
#    garment).
# 2. The TLS certificate and key (made on the host by make-certs.sh, mounted
#    read-only at $MOSQUITTO_CERTS_IN) are copied to $MOSQUITTO_CONFIG_DIR/certs,
#    owned by the mosquitto user (the broker loads them after dropping root),
#    the key 0600. An empty MOSQUITTO_CERTS_IN
#    skips this (a configuration without the TLS listener).
# 3. Merge, for each kind of listener (devices: 1883 and 8883; services:
#    1884): the password_file mosquitto reads ($MOSQUITTO_CONFIG_DIR/KIND.passwd)
#    is static-KIND.passwd followed by the registry's KIND.passwd (in
#    $MOSQUITTO_REGISTRY_DIR, written by `compression devices serve`), minus
#    any registry line for a name that static-KIND.passwd already has; the
#    acl_file (KIND.acl) is the registry's KIND.acl (minus the blocks of those
#    names) followed by static-KIND.acl. The registry's ACL comes first so
#    that a topic line before its first "user" line could only ever apply to
#    anonymous clients (refused), never to a static account. A registry
#    account never reaches the other kind's files.
# 4. A watcher in the background: every $MOSQUITTO_WATCH_INTERVAL_S seconds
#    (default 5) it checksums the eight input files; when they changed, it
#    merges again and sends the broker SIGHUP, which makes Mosquitto 2.0
#    re-read the files (it does not watch them itself, and the registry's
#    container cannot signal a process of this one). The SIGHUP is held back
#    until the broker has installed its SIGHUP handler (SigCgt in
#    /proc/PID/status), because an early SIGHUP would end the broker.
# 5. exec COMMAND: the broker takes over this shell's PID, which is the PID
#    the watcher signals, and stays PID 1 of the container (docker stop
#    reaches it directly; the watcher ends with the container).
#
# POSIX sh: runs with busybox ash (the eclipse-mosquitto image is Alpine) and
# with dash; it needs md5sum, awk, mktemp (busybox has them).
# tests/integration/test_broker_watcher.py runs it against Debian's mosquitto.
set -eu

config_dir=${MOSQUITTO_CONFIG_DIR:-/mosquitto/config}
registry_dir=${MOSQUITTO_REGISTRY_DIR:-/registry}
certs_in=${MOSQUITTO_CERTS_IN-/certs}
interval=${MOSQUITTO_WATCH_INTERVAL_S:-5}
deploy_dir=${MOSQUITTO_DEPLOY_DIR:-$(dirname "$0")}
export MOSQUITTO_CONFIG_DIR="$config_dir" MOSQUITTO_DEPLOY_DIR="$deploy_dir"

# The two kinds of listener, each with its own password file and ACL (mosquitto.conf).
kinds="devices services"

say() {
    echo "entrypoint.sh: $*" >&2
}

case $interval in
    "" | *[!0-9]* | 0) say "MOSQUITTO_WATCH_INTERVAL_S must be a whole number of seconds, at least 1"; exit 1 ;;
esac

# Owner mosquitto (when root and the user exists) and the given mode, then rename into place.
install_file() {
    if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
        chown mosquitto:mosquitto "$1"
    fi
    chmod "$3" "$1"
    mv -f "$1" "$2"
}

# --- 1. the static accounts ------------------------------------------------------------------------------------------
sh "$deploy_dir/make-passwd.sh"
umask 077

# --- 2. TLS certificate and key -------------------------------------------------------------------------------------
if [ -n "$certs_in" ]; then
    for name in ca.crt server.crt server.key; do
        if [ ! -s "$certs_in/$name" ]; then
            say "$certs_in/$name is missing: make the certificates on the host first:"
            say "    MQTT_TLS_HOSTNAME=mqtt.example.org sh deploy/mosquitto/make-certs.sh"
            exit 1
        fi
    done
    # Mosquitto reads them after dropping to the mosquitto user (checked with 2.0.11).
    mkdir -p "$config_dir/certs"
    if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
        chown mosquitto:mosquitto "$config_dir/certs"
    fi
    chmod 0700 "$config_dir/certs"
    for name in ca.crt server.crt server.key; do
        tmp=$(mktemp "$config_dir/certs/.$name.XXXXXX")
        cat "$certs_in/$name" >"$tmp"
        case $name in
            *.key) install_file "$tmp" "$config_dir/certs/$name" 0600 ;;
            *) install_file "$tmp" "$config_dir/certs/$name" 0644 ;;
        esac
    done
    say "TLS: certificate and key installed in $config_dir/certs"
fi

# --- 3. merge --------------------------------------------------------------------------------------------------------

# The names of a static password file ($1), one a line.
static_names() {
    awk -F: '$1 != "" && $1 !~ /^#/ { print $1 }' "$1"
}

# Write the merged password file ($2) and ACL ($3) of one kind ($1) into temporary files; non-zero on any error.
merge_kind() {
    kind=$1
    static_passwd=$config_dir/static-$kind.passwd
    static_acl=$config_dir/static-$kind.acl
    registry_passwd=$registry_dir/$kind.passwd
    registry_acl=$registry_dir/$kind.acl
    names=$(static_names "$static_passwd") || names=""
    {
        cat "$static_passwd"
        if [ -r "$registry_passwd" ]; then
            # Only name:$6$... or name:$7$... lines of names that are not static.
            printf '%s\n' "$names" | awk -F: '
                NR == FNR { if ($0 != "") static[$0] = 1; next }
                NF >= 2 && $1 != "" && !($1 in static) && $2 ~ /^\$[67]\$/ && $0 !~ /[ \t]/ { print }
            ' - "$registry_passwd"
        fi
    } >"$2" && {
        echo "# Written by entrypoint.sh: the registry's ACL ($registry_acl), then static-$kind.acl. Edits here are overwritten."
        if [ -r "$registry_acl" ]; then
            # Drop the blocks ("user NAME" up to the next "user" line) of static names.
            printf '%s\n' "$names" | awk '
                NR == FNR { if ($0 != "") static[$0] = 1; next }
                $1 == "user" { skip = ($2 in static) }
                !skip { print }
            ' - "$registry_acl"
        fi
        echo
        cat "$static_acl"
    } >"$3"
}

# Count the accounts of a password file.
accounts_in() {
    awk -F: 'NF >= 2 && $1 !~ /^#/ { n++ } END { print n + 0 }' "$1"
}

# Write the merged files of both kinds; returns non-zero (files untouched) on any error.
merge() {
    tmps=""
    ok=true
    for kind in $kinds; do
        passwd_tmp=$(mktemp "$config_dir/.$kind.passwd.XXXXXX") || { ok=false; break; }
        tmps="$tmps $passwd_tmp"
        acl_tmp=$(mktemp "$config_dir/.$kind.acl.XXXXXX") || { ok=false; break; }
        tmps="$tmps $acl_tmp"
        merge_kind "$kind" "$passwd_tmp" "$acl_tmp" || { ok=false; break; }
    done
    if ! $ok; then
        # shellcheck disable=SC2086 # the list of temporary files, split on purpose
        rm -f $tmps
        return 1
    fi
    # Password files first: a new account can log in before an ACL lets it act.
    # shellcheck disable=SC2086 # the list of temporary files, split on purpose
    set -- $tmps
    for kind in $kinds; do
        install_file "$1" "$config_dir/$kind.passwd" 0600
        shift 2
    done
    # shellcheck disable=SC2086 # the list of temporary files, split on purpose
    set -- $tmps
    for kind in $kinds; do
        install_file "$2" "$config_dir/$kind.acl" 0600
        shift 2
    done
    summary=""
    for kind in $kinds; do
        static_count=$(accounts_in "$config_dir/static-$kind.passwd")
        total=$(accounts_in "$config_dir/$kind.passwd")
        note=""
        [ -r "$registry_dir/$kind.passwd" ] || note=" (no $registry_dir/$kind.passwd yet)"
        summary="$summary; $kind: $static_count static, $((total - static_count)) from the registry$note"
    done
    say "merged $config_dir/{devices,services}.{passwd,acl}$summary"
    return 0
}

# One line that changes whenever any input file changes (or appears, or goes).
fingerprint() {
    for kind in $kinds; do
        for f in "$config_dir/static-$kind.passwd" "$config_dir/static-$kind.acl" \
            "$registry_dir/$kind.passwd" "$registry_dir/$kind.acl"; do
            if [ -r "$f" ]; then
                md5sum <"$f"
            else
                echo "absent $f"
            fi
        done
    done | md5sum
}

# Whether process $1 has a handler for SIGHUP (bit 0 of SigCgt); true when /proc cannot tell.
catches_hup() {
    mask=$(awk '$1 == "SigCgt:" { print $2 }' "/proc/$1/status" 2>/dev/null) || return 0
    [ -n "$mask" ] || return 0
    case $mask in
        *[13579bdfBDF]) return 0 ;;
        *) return 1 ;;
    esac
}

# --- 4. the watcher ---------------------------------------------------------------------------------------------------
watch_files() {
    set +e
    broker=$1
    last=$2
    pending=false
    while kill -0 "$broker" 2>/dev/null; do
        sleep "$interval"
        now=$(fingerprint)
        if [ "$now" != "$last" ]; then
            # The registry replaces its four files one after the other: let them all land.
            sleep 1
            now=$(fingerprint)
            if merge; then
                last=$now
                pending=true
            else
                say "merging the broker's files failed; the broker keeps its current accounts (retrying)"
            fi
        fi
        if $pending && catches_hup "$broker"; then
            if kill -HUP "$broker" 2>/dev/null; then
                say "sent SIGHUP to the broker (pid $broker): accounts and ACL reloaded"
                pending=false
            fi
        fi
    done
}

start=$(fingerprint)
merge || { say "cannot write the merged password and ACL files in $config_dir"; exit 1; }

if [ "$#" -eq 0 ]; then
    exit 0  # merged once; nothing to run or watch
fi

say "watching $registry_dir every ${interval}s for the registry's accounts"
watch_files "$$" "$start" &

exec "$@"
