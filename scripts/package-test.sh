#!/usr/bin/env bash
# Installs the .deb built by scripts/package.sh on this Debian machine and
# checks what a hospital admin gets: files, owners and modes, units not
# enabled, --version, the man page, `check` as the service user against
# the simulator, an upgrade over a changed configuration (kept), and a
# purge that keeps the store and its key. Then the .rpm's file list and
# scriptlets, where the rpm tool is installed.
#
# It installs and purges a system package, and clears what an earlier run
# of it left in /etc/fttp-agent and /var/{lib,log}/fttp-agent: it runs only
# as root, and only in CI or with FTTP_PACKAGE_TEST=1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] || { [ -z "${CI:-}" ] && [ -z "${FTTP_PACKAGE_TEST:-}" ]; }; then
    echo "package-test: skipped (needs root, and CI=true or FTTP_PACKAGE_TEST=1)" >&2
    exit 0
fi
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }
expect_mode() { # path mode user group
    local got
    got=$(stat -c '%a %U %G' "$1") || fail "$1 is missing"
    [ "$got" = "$2 $3 $4" ] || fail "$1 is '$got', expected '$2 $3 $4'"
}
deb=$(ls target/debian/fttp-agent_*.deb | head -1)
[ -f "$deb" ] || fail "no .deb in target/debian (run scripts/package.sh)"

echo "package-test: lintian"
lintian --fail-on error "$deb"

echo "package-test: install"
dpkg --purge fttp-agent >/dev/null 2>&1 || true
rm -rf /etc/fttp-agent /var/lib/fttp-agent /var/log/fttp-agent
dpkg -i "$deb"
expect_mode /usr/bin/fttp-agent 755 root root
expect_mode /etc/fttp-agent 750 root fttp-agent
expect_mode /etc/fttp-agent/config.toml 640 root fttp-agent
expect_mode /etc/fttp-agent/store.key 600 fttp-agent fttp-agent
expect_mode /var/lib/fttp-agent 700 fttp-agent fttp-agent
expect_mode /var/log/fttp-agent 750 fttp-agent fttp-agent
for f in /usr/lib/systemd/system/fttp-agent.service /usr/lib/systemd/system/fttp-agent.timer \
    /usr/lib/systemd/system/fttp-agent-daemon.service /usr/lib/sysusers.d/fttp-agent.conf \
    /usr/lib/tmpfiles.d/fttp-agent.conf /usr/share/doc/fttp-agent/README.md \
    /usr/share/doc/fttp-agent/config.example.toml /usr/share/doc/fttp-agent/copyright \
    /usr/share/bash-completion/completions/fttp-agent /usr/share/zsh/vendor-completions/_fttp-agent \
    /usr/share/fish/vendor_completions.d/fttp-agent.fish /usr/share/man/man1/fttp-agent.1.gz \
    /usr/share/man/man1/fttp-agent-run.1.gz; do
    [ -f "$f" ] || fail "$f was not installed"
done
cmp -s /etc/fttp-agent/config.toml config.example.toml || fail "the configuration is not config.example.toml"
# Installed, not enabled, nothing started.
if ls /etc/systemd/system/*.wants/fttp-agent* >/dev/null 2>&1; then
    fail "a unit was enabled by the package"
fi
if command -v systemd-analyze >/dev/null 2>&1; then
    systemd-analyze verify /usr/lib/systemd/system/fttp-agent.service /usr/lib/systemd/system/fttp-agent.timer \
        /usr/lib/systemd/system/fttp-agent-daemon.service
fi
/usr/bin/fttp-agent --version | grep -Eq '^fttp-agent [0-9.]+ \(commit [0-9a-f]{7,}\)$' \
    || fail "--version does not name the commit: $(/usr/bin/fttp-agent --version)"
man -w fttp-agent >/dev/null || fail "man -w fttp-agent finds no page"

echo "package-test: check and a cycle as fttp-agent, against the simulator"
port=18089
/usr/bin/fttp-agent sim --port "$port" --api-key package-test-key --empty >/dev/null 2>&1 &
sim=$!
trap 'kill $sim 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
printf 'package-test-key\n' >/etc/fttp-agent/api-key
chown fttp-agent:fttp-agent /etc/fttp-agent/api-key
chmod 0600 /etc/fttp-agent/api-key
cat >/etc/fttp-agent/config.toml <<CONF
# changed by the admin (package-test)
[dispatcher]
url = "http://127.0.0.1:$port/ttp-fhir/fhir/dispatcher"
api_key_file = "/etc/fttp-agent/api-key"

[site]
study = "mii"
target = "dic_demo"

[store]
path = "/var/lib/fttp-agent"
key_file = "/etc/fttp-agent/store.key"

[log]
audit = "/var/log/fttp-agent/audit.ndjson"
CONF
runuser -u fttp-agent -- /usr/bin/fttp-agent --config /etc/fttp-agent/config.toml check
runuser -u fttp-agent -- /usr/bin/fttp-agent --config /etc/fttp-agent/config.toml run --once
[ -f /var/lib/fttp-agent/store.sqlite3 ] || fail "the cycle made no store"
cp /etc/fttp-agent/config.toml /tmp/package-test-config.toml
key_sum=$(sha256sum </etc/fttp-agent/store.key)

echo "package-test: upgrade over itself"
dpkg -i "$deb"
cmp -s /etc/fttp-agent/config.toml /tmp/package-test-config.toml || fail "the upgrade replaced the configuration"
[ "$(sha256sum </etc/fttp-agent/store.key)" = "$key_sum" ] || fail "the upgrade replaced the store key"
expect_mode /etc/fttp-agent/config.toml 640 root fttp-agent
runuser -u fttp-agent -- /usr/bin/fttp-agent --config /etc/fttp-agent/config.toml status >/dev/null || true
runuser -u fttp-agent -- /usr/bin/fttp-agent --config /etc/fttp-agent/config.toml check >/dev/null

echo "package-test: purge"
out=$(dpkg --purge fttp-agent 2>&1)
echo "$out"
[ ! -e /usr/bin/fttp-agent ] || fail "purge left the binary"
[ -f /var/lib/fttp-agent/store.sqlite3 ] || fail "purge deleted the store"
[ "$(sha256sum </etc/fttp-agent/store.key)" = "$key_sum" ] || fail "purge deleted the store key"
echo "$out" | grep -q "kept the store /var/lib/fttp-agent" || fail "purge did not say where the store is"
kill "$sim" 2>/dev/null || true

if command -v rpm >/dev/null 2>&1; then
    echo "package-test: the .rpm"
    rpmfile=$(ls target/generate-rpm/fttp-agent-*.rpm | head -1)
    files=$(rpm -qlp "$rpmfile")
    for f in /usr/bin/fttp-agent /etc/fttp-agent/config.toml /usr/lib/systemd/system/fttp-agent.timer \
        /usr/lib/sysusers.d/fttp-agent.conf /usr/lib/tmpfiles.d/fttp-agent.conf /usr/share/man/man1/fttp-agent.1.gz \
        /usr/share/doc/fttp-agent/README.md /usr/share/licenses/fttp-agent/LICENSE; do
        echo "$files" | grep -qx "$f" || fail "the .rpm lacks $f"
    done
    rpm -qp --configfiles "$rpmfile" | grep -qx /etc/fttp-agent/config.toml || fail "config.toml is not a config file"
    scripts=$(rpm -qp --scripts "$rpmfile")
    for s in "postinstall scriptlet" "preuninstall scriptlet" "postuninstall scriptlet" systemd-sysusers \
        "fttp-agent keygen" "kept the store"; do
        echo "$scripts" | grep -q "$s" || fail "the .rpm's scriptlets lack '$s'"
    done
else
    echo "package-test: rpm is not installed: the .rpm is not checked" >&2
fi
echo "package-test: ok"
