#!/usr/bin/env bash
# Builds the .deb (cargo-deb) and the .rpm (cargo-generate-rpm) from a
# stripped release build, into target/debian/ and target/generate-rpm/.
# The man pages and completions come from the binary's own command-line
# definitions; the maintainer scripts get the shared set-up inlined.
# Installs cargo-deb and cargo-generate-rpm (by name, --locked) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in cargo-deb cargo-generate-rpm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "package: installing $tool (once per machine)"
        cargo install "$tool" --locked --quiet
    fi
done
CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_RELEASE_DEBUG=false cargo build --release --locked
out=target/package
rm -rf "$out"
mkdir -p "$out/debian" "$out/rpm"
target/release/fttp-agent man "$out/man"
gzip -9n "$out"/man/*.1
target/release/fttp-agent completions "$out/completions"
setup=scripts/packaging/setup.sh
inline() { # $1 template, $2 output: FTTP_AGENT_SETUP replaced by setup.sh
    awk -v setup="$setup" '$0 == "FTTP_AGENT_SETUP" { while ((getline l < setup) > 0) print l; close(setup); next } { print }' "$1" >"$2"
}
for s in postinst prerm postrm; do
    inline "scripts/packaging/debian/$s" "$out/debian/$s"
    chmod 0755 "$out/debian/$s"
done
for s in post preun postun; do
    inline "scripts/packaging/rpm/$s.sh" "$out/rpm/$s.sh"
done
cargo deb --no-build --no-strip
cargo generate-rpm
ls -l target/debian/*.deb target/generate-rpm/*.rpm
