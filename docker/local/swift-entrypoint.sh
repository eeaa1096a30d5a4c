#!/bin/bash
# An S3-compatible object store for docker/compose.s3.yaml: OpenStack Swift (Debian's packages) as a
# single-node "all in one" on /srv/node, its s3api middleware in front of tempauth (the layout of
# tests/s3_server.py, which the tests start the same way without Docker). It creates the bucket
# S3_BUCKET at start; the S3 credentials are S3_ACCESS_KEY (account:user) and S3_SECRET_KEY.
# Runs the account, container and object servers and the proxy (port S3_PORT); exits when one of them does.
set -euo pipefail

ETC=${SWIFT_ETC:-/etc/swift-aio}
DEVICES=${SWIFT_DEVICES:-/srv/node}
PORT=${S3_PORT:-8080}
BUCKET=${S3_BUCKET:-consa}
ACCESS=${S3_ACCESS_KEY:-consa:consa}
SECRET=${S3_SECRET_KEY:-consa-secret}
ACCOUNT=${ACCESS%%:*}
USER_=${ACCESS#*:}
declare -A PORTS=([account]=${SWIFT_ACCOUNT_PORT:-6202} [container]=${SWIFT_CONTAINER_PORT:-6201} [object]=${SWIFT_OBJECT_PORT:-6200})

READY=${S3_READY_FILE:-/tmp/consa-bucket-ready}  # the healthcheck's sign that the bucket exists
rm -f "$READY"
mkdir -p "$ETC" "$DEVICES/d1"
cat > "$ETC/swift.conf" <<EOF
[swift-hash]
swift_hash_path_suffix = ${SWIFT_HASH_SUFFIX:-consa-store}
swift_hash_path_prefix = consa

[storage-policy:0]
name = gold
default = yes
EOF

common() {  # $1: server name, $2: port
  printf '[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = %s\nswift_dir = %s\ndevices = %s\nmount_check = false\nworkers = 0\nlog_level = WARNING\nlog_name = swift-%s\n' \
    "$2" "$ETC" "$DEVICES" "$1"
}
for name in account container object; do
  { common "$name" "${PORTS[$name]}"
    printf '\n[pipeline:main]\npipeline = %s-server\n\n[app:%s-server]\nuse = egg:swift#%s\n' "$name" "$name" "$name"
  } > "$ETC/$name-server.conf"
  if [ ! -f "$ETC/$name.ring.gz" ]; then
    swift-ring-builder "$ETC/$name.builder" create 6 1 1 >/dev/null
    swift-ring-builder "$ETC/$name.builder" add "r1z1-127.0.0.1:${PORTS[$name]}/d1" 1 >/dev/null
    swift-ring-builder "$ETC/$name.builder" rebalance >/dev/null || true  # one device: a warning, the ring is written
  fi
done
{ printf '[DEFAULT]\nbind_ip = 0.0.0.0\nbind_port = %s\nswift_dir = %s\nworkers = 0\nlog_level = WARNING\nlog_name = swift-proxy\n' "$PORT" "$ETC"
  cat <<EOF

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true

[filter:s3api]
use = egg:swift#s3api
location = us-east-1
s3_acl = false

[filter:tempauth]
use = egg:swift#tempauth
user_${ACCOUNT}_${USER_} = ${SECRET} .admin

EOF
  # The pipeline's plain filters, each its own egg entry point (name in the pipeline: entry point).
  for filter in catch_errors gatekeeper healthcheck proxy-logging:proxy_logging cache:memcache listing_formats \
                bulk copy slo dlo; do
    printf '\n[filter:%s]\nuse = egg:swift#%s\n' "${filter%%:*}" "${filter#*:}"
  done
} > "$ETC/proxy-server.conf"

pids=()
for name in account container object; do
  swift-"$name"-server "$ETC/$name-server.conf" & pids+=($!)
done
swift-proxy-server "$ETC/proxy-server.conf" & pids+=($!)
trap 'kill "${pids[@]}" 2>/dev/null; wait' TERM INT

# The bucket, made through the S3 API once the proxy answers (a SigV2-signed CreateBucket: the standard
# library suffices; tempauth's own tokens would need memcached).
python3 - "$PORT" "$ACCESS" "$SECRET" "$BUCKET" "$READY" <<'EOF'
import base64, email.utils, hashlib, hmac, sys, time, urllib.error, urllib.request
port, access, secret, bucket, ready = sys.argv[1:]
for _ in range(600):
    date = email.utils.formatdate(usegmt=True)
    signature = base64.b64encode(hmac.new(secret.encode(), f"PUT\n\n\n{date}\n/{bucket}".encode(),
                                          hashlib.sha1).digest()).decode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT",
                                 headers={"Date": date, "Authorization": f"AWS {access}:{signature}"})
    try:
        urllib.request.urlopen(req, timeout=10).close()
        break
    except urllib.error.HTTPError as e:
        if e.code == 409:  # BucketAlreadyOwnedByYou: a restart on the same volume
            break
        time.sleep(0.5)
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("swift's proxy did not make the bucket")
open(ready, "w").close()
print(f"bucket {bucket} ready", flush=True)
EOF

wait -n "${pids[@]}"
status=$?
kill "${pids[@]}" 2>/dev/null || true
exit "$status"
