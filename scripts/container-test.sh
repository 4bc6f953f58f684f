#!/usr/bin/env bash
# Checks the image scripts/container.sh built. Containers cannot be started
# on the build machines, so the image's filesystem is tested directly: its
# metadata (podman inspect), then, mounted, the binary run as the image's
# user with `chroot --userspec`: --version, `check --offline` with a
# configuration and keys put where the volume would be, and `demo`. No file
# of the image may hold a configuration or a key. Runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
driver="${STORAGE_DRIVER:-vfs}"
podman() { command podman --storage-driver "$driver" "$@"; }
fail() { echo "container-test: FAILED: $*" >&2; exit 1; }
uid=10001
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
image="localhost/fttp-agent:$version"

echo "container-test: metadata"
podman image inspect "$image" >target/container-inspect.json
python3 - "$uid" "$version" "$commit" <<'PY' || fail "the image's metadata"
import json, sys
uid, version, commit = sys.argv[1:]
d = json.load(open("target/container-inspect.json"))[0]
c = d["Config"]
def check(what, got, want):
    if got != want:
        sys.exit(f"{what}: {got!r}, expected {want!r}")
check("user", c.get("User"), f"{uid}:{uid}")
check("entrypoint", c.get("Entrypoint"), ["/usr/bin/fttp-agent"])
check("command", c.get("Cmd"), ["--config", "/etc/fttp-agent/config.toml", "run"])
check("volumes", sorted(c.get("Volumes", {})), ["/etc/fttp-agent", "/var/lib/fttp-agent", "/var/log/fttp-agent"])
hc = d.get("Healthcheck") or {}
check("health check", hc.get("Test"),
      ["CMD", "/usr/bin/fttp-agent", "--config", "/etc/fttp-agent/config.toml", "status", "--healthcheck"])
labels = c.get("Labels", {})
for k, v in [("org.opencontainers.image.version", version), ("org.opencontainers.image.revision", commit),
             ("org.opencontainers.image.licenses", "Apache-2.0")]:
    check(k, labels.get(k), v)
if not labels.get("org.opencontainers.image.source"):
    sys.exit("no source label")
print(f"container-test: {d['Size'] // 1000000} MB")
PY

echo "container-test: the filesystem"
ctr=$(podman create "$image")
mnt=$(podman mount "$ctr")
trap 'podman umount "$ctr" >/dev/null 2>&1 || true; podman rm "$ctr" >/dev/null 2>&1 || true' EXIT
# Nothing secret in the image: no configuration, no key, an empty config volume.
[ -z "$(find "$mnt/etc/fttp-agent" -mindepth 1)" ] || fail "the image holds files in /etc/fttp-agent"
found=$(find "$mnt" -xdev \( -name '*.key' -o -name 'fttp-agent.toml' -o -name 'api-key' \) -print)
[ -z "$found" ] || fail "the image holds key or config files: $found"
as_user() { chroot --userspec="$uid:$uid" "$mnt" "$@"; }
as_user /usr/bin/fttp-agent --version | grep -q "commit $commit" || fail "--version does not name $commit"
# What an admin's volumes hold: the configuration and keys, the store.
as_user /usr/bin/fttp-agent keygen /var/lib/fttp-agent/store.key >/dev/null
printf 'container-test-api-key\n' >"$mnt/etc/fttp-agent/api-key"
chown "$uid:$uid" "$mnt/etc/fttp-agent/api-key"
chmod 0600 "$mnt/etc/fttp-agent/api-key"
mv "$mnt/var/lib/fttp-agent/store.key" "$mnt/etc/fttp-agent/store.key"
cat >"$mnt/etc/fttp-agent/config.toml" <<'CONF'
[dispatcher]
url = "https://fttp.example.org/ttp-fhir/fhir/dispatcher"
api_key_file = "/etc/fttp-agent/api-key"

[site]
study = "mii"
target = "dic_example"

[store]
path = "/var/lib/fttp-agent"
key_file = "/etc/fttp-agent/store.key"

[log]
audit = "/var/log/fttp-agent/audit.ndjson"
CONF
chmod 0640 "$mnt/etc/fttp-agent/config.toml"
chgrp "$uid" "$mnt/etc/fttp-agent/config.toml"
as_user /usr/bin/fttp-agent --config /etc/fttp-agent/config.toml check --offline >/dev/null \
    || fail "check --offline as the image's user"
install -d -m 0700 -o "$uid" -g "$uid" "$mnt/var/lib/fttp-agent/demo"
as_user /usr/bin/fttp-agent demo --dir /var/lib/fttp-agent/demo >/dev/null || fail "demo as the image's user"

echo "container-test: the OCI archive"
archive="target/fttp-agent-$version.oci.tar"
[ -f "$archive" ] || fail "no $archive"
manifests=$(tar -xOf "$archive" index.json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["manifests"]))')
[ "$manifests" = 1 ] || fail "$archive lists $manifests images"
echo "container-test: ok"
