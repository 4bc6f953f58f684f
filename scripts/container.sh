#!/usr/bin/env bash
# Builds the container image localhost/fttp-agent:<version> and an OCI
# archive of it, target/fttp-agent-<version>.oci.tar.
#
# No image can be pulled from a registry on the build machines, so the
# base is made from Debian packages: mmdebstrap --variant=minbase of the
# Debian release this binary is built on, with ca-certificates (and no
# documentation, man pages or locales), imported into podman. The release
# binary of this checkout goes in; no configuration and no key do (they
# come in volumes). Nothing in the image runs a shell: entrypoint and
# health check are exec form. Runs as root (mmdebstrap --mode=root, a
# chroot to add the user); storage driver vfs unless STORAGE_DRIVER says
# otherwise (it works inside other containers).
set -euo pipefail
cd "$(dirname "$0")/.."
driver="${STORAGE_DRIVER:-vfs}"
podman() { command podman --storage-driver "$driver" "$@"; }
buildah() { command buildah --storage-driver "$driver" "$@"; }
uid=10001
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
. /etc/os-release
suite="${VERSION_CODENAME:?the build machine names no Debian release}"
image="localhost/fttp-agent:$version"
base="localhost/fttp-agent-base:$suite"
out=target/container
mkdir -p "$out"

CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_RELEASE_DEBUG=false cargo build --release --locked

if ! podman image exists "$base"; then
    echo "container: making the base from Debian $suite packages (mmdebstrap)"
    mmdebstrap --variant=minbase --include=ca-certificates --mode=root \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        "$suite" "$out/rootfs.tar"
    podman import --change 'CMD ["/bin/true"]' "$out/rootfs.tar" "$base"
    rm -f "$out/rootfs.tar"
fi

ctr=$(buildah from --pull=never "$base")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$(buildah mount "$ctr")
install -m 0755 target/release/fttp-agent "$mnt/usr/bin/fttp-agent"
chroot "$mnt" groupadd --gid "$uid" fttp-agent
chroot "$mnt" useradd --uid "$uid" --gid "$uid" --home-dir /var/lib/fttp-agent --no-create-home \
    --shell /usr/sbin/nologin fttp-agent
install -d -m 0750 -o root -g "$uid" "$mnt/etc/fttp-agent"
install -d -m 0700 -o "$uid" -g "$uid" "$mnt/var/lib/fttp-agent"
install -d -m 0750 -o "$uid" -g "$uid" "$mnt/var/log/fttp-agent"
install -d -m 0755 "$mnt/usr/share/doc/fttp-agent"
install -m 0644 README.md CHANGELOG.md config.example.toml LICENSE "$mnt/usr/share/doc/fttp-agent/"
buildah umount "$ctr" >/dev/null

buildah config \
    --user "$uid:$uid" \
    --workingdir /var/lib/fttp-agent \
    --entrypoint '["/usr/bin/fttp-agent"]' \
    --cmd '["--config", "/etc/fttp-agent/config.toml", "run"]' \
    --volume /etc/fttp-agent --volume /var/lib/fttp-agent --volume /var/log/fttp-agent \
    --stop-signal SIGTERM \
    --healthcheck 'CMD /usr/bin/fttp-agent --config /etc/fttp-agent/config.toml status --healthcheck' \
    --healthcheck-interval 5m --healthcheck-timeout 30s --healthcheck-start-period 1m --healthcheck-retries 3 \
    --label "org.opencontainers.image.title=fttp-agent" \
    --label "org.opencontainers.image.description=Site agent for the fTTP dispatcher: resolves record-linkage tasks before they expire" \
    --label "org.opencontainers.image.source=https://example.org/fttp-agent" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$commit" \
    --label "org.opencontainers.image.licenses=Apache-2.0" \
    --label "org.opencontainers.image.base.name=debian:$suite (mmdebstrap minbase)" \
    "$ctr"
# (Docker format: OCI image configs have no HEALTHCHECK.)
buildah commit --format docker --rm "$ctr" "$image" >/dev/null
trap - EXIT
rm -f "target/fttp-agent-$version.oci.tar"
podman save --format oci-archive -o "target/fttp-agent-$version.oci.tar" "$image"
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "container: $image, $((size / 1000000)) MB; archive target/fttp-agent-$version.oci.tar"
