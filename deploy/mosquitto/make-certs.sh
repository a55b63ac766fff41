#!/bin/sh
# Make the TLS certificates of the broker's listener 8883: a private CA and a
# server certificate signed by it. Run on the host, before the first
# `docker compose up` (needs openssl):
#
#   MQTT_TLS_HOSTNAME=mqtt.example.org sh deploy/mosquitto/make-certs.sh [OUT_DIR]
#
#   MQTT_TLS_HOSTNAME     required: the name (or IPv4 address) garments and
#                         gateways connect to; the certificate's CN and first SAN.
#   MQTT_TLS_EXTRA_SANS   optional: more SANs, comma-separated, e.g.
#                         DNS:mqtt.local,IP:192.168.1.20. DNS:mosquitto (the
#                         compose service name), DNS:localhost and IP:127.0.0.1
#                         are always included.
#   MQTT_TLS_DAYS         server certificate validity (default 825 days).
#   MQTT_TLS_CA_DAYS      CA validity (default 3650 days).
#
# OUT_DIR (default: tls/ beside this script, which git ignores) receives
#   ca/ca.key ca/ca.crt      the private CA. The key never goes into a
#                            container; keep a copy offline.
#   broker/ca.crt            the CA certificate: give it to garments, gateways
#                            and clients (COMPRESSION_MQTT_TLS_CA_FILE).
#   broker/server.crt        the server certificate (SANs above), and its key
#   broker/server.key        (0600). docker-compose.yml mounts broker/ into
#                            the mosquitto service, read-only.
#
# Idempotent: an existing CA is kept (garments keep trusting it); the server
# certificate is made again only when it is missing, its SANs changed, it
# expires within 30 days or the CA does not verify it; its key is kept. After
# a new server certificate: docker compose restart mosquitto.
set -eu

fail() {
    echo "make-certs.sh: $*" >&2
    exit 1
}

command -v openssl >/dev/null 2>&1 || fail "openssl is not installed (Debian: apt-get install openssl)"

host=${MQTT_TLS_HOSTNAME:-}
[ -n "$host" ] || fail "set MQTT_TLS_HOSTNAME (the broker's name as garments reach it), e.g. MQTT_TLS_HOSTNAME=mqtt.example.org"
case $host in
    *[!A-Za-z0-9.-]* | .* | -*) fail "MQTT_TLS_HOSTNAME '$host' is not a host name or IPv4 address" ;;
esac
extra=${MQTT_TLS_EXTRA_SANS:-}
case $extra in
    *[!A-Za-z0-9.:,-]*) fail "MQTT_TLS_EXTRA_SANS '$extra' must look like DNS:name,IP:address" ;;
esac
days=${MQTT_TLS_DAYS:-825}
ca_days=${MQTT_TLS_CA_DAYS:-3650}
case $days$ca_days in
    *[!0-9]*) fail "MQTT_TLS_DAYS and MQTT_TLS_CA_DAYS are whole numbers of days" ;;
esac

out=${1:-$(dirname "$0")/tls}
ca_dir=$out/ca
broker_dir=$out/broker
umask 077
mkdir -p "$ca_dir" "$broker_dir"

case $host in
    *[!0-9.]*) first="DNS:$host" ;;
    *) first="IP:$host" ;;
esac
sans="$first,DNS:mosquitto,DNS:localhost,IP:127.0.0.1${extra:+,$extra}"

work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- the CA: made once ---------------------------------------------------------------------------------------------
if [ ! -s "$ca_dir/ca.key" ] || [ ! -s "$ca_dir/ca.crt" ]; then
    openssl req -x509 -new -newkey rsa:3072 -nodes -sha256 -days "$ca_days" \
        -keyout "$work/ca.key" -out "$work/ca.crt" \
        -subj "/O=Compression telemetry/CN=Compression telemetry MQTT CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>"$work/openssl.log" || { cat "$work/openssl.log" >&2; fail "making the CA failed"; }
    chmod 0600 "$work/ca.key"
    chmod 0644 "$work/ca.crt"
    mv -f "$work/ca.key" "$ca_dir/ca.key"
    mv -f "$work/ca.crt" "$ca_dir/ca.crt"
    echo "make-certs.sh: new CA $ca_dir/ca.crt (valid $ca_days days)"
else
    echo "make-certs.sh: keeping the CA $ca_dir/ca.crt"
fi

# --- the server certificate: made when needed ----------------------------------------------------------------------
reason=""
if [ ! -s "$broker_dir/server.crt" ] || [ ! -s "$broker_dir/server.key" ]; then
    reason="none yet"
elif [ "$(cat "$broker_dir/server.sans" 2>/dev/null || true)" != "$sans" ]; then
    reason="the SANs changed"
elif ! openssl x509 -checkend $((30 * 86400)) -noout -in "$broker_dir/server.crt" >/dev/null; then
    reason="it expires within 30 days"
elif ! openssl verify -CAfile "$ca_dir/ca.crt" "$broker_dir/server.crt" >/dev/null 2>&1; then
    reason="the CA does not verify it"
fi

if [ -n "$reason" ]; then
    if [ ! -s "$broker_dir/server.key" ]; then
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/server.key" 2>"$work/openssl.log" \
            || { cat "$work/openssl.log" >&2; fail "making the server key failed"; }
        chmod 0600 "$work/server.key"
        mv -f "$work/server.key" "$broker_dir/server.key"
    fi
    cat >"$work/ext.cnf" <<EOF
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $sans
EOF
    openssl req -new -key "$broker_dir/server.key" -subj "/O=Compression telemetry/CN=$host" \
        -out "$work/server.csr" 2>"$work/openssl.log" || { cat "$work/openssl.log" >&2; fail "making the request failed"; }
    openssl x509 -req -in "$work/server.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 -extfile "$work/ext.cnf" \
        -out "$work/server.crt" 2>"$work/openssl.log" || { cat "$work/openssl.log" >&2; fail "signing failed"; }
    chmod 0644 "$work/server.crt"
    mv -f "$work/server.crt" "$broker_dir/server.crt"
    printf '%s' "$sans" >"$broker_dir/server.sans"
    chmod 0644 "$broker_dir/server.sans"
    echo "make-certs.sh: new server certificate $broker_dir/server.crt ($reason): $sans, valid $days days"
else
    echo "make-certs.sh: keeping the server certificate $broker_dir/server.crt ($sans)"
fi

cp "$ca_dir/ca.crt" "$work/ca.crt"
chmod 0644 "$work/ca.crt"
mv -f "$work/ca.crt" "$broker_dir/ca.crt"
chmod 0700 "$ca_dir"
chmod 0755 "$out" "$broker_dir"
