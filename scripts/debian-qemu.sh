#!/usr/bin/env bash
# Build (once) a minimal Debian root holding another release's QEMU, and a
# wrapper that runs that QEMU inside the root, so the kit can be driven
# against a QEMU other than the installed one.
#
#   scripts/debian-qemu.sh RELEASE [ROOT]   e.g. trixie (QEMU 10.0), bullseye (QEMU 5.2)
#
# ROOT defaults to /var/cache/vhostlab/RELEASE, outside any clone, so that CI
# runs from fresh clones on the same machine reuse one root.
#
# Prints the wrapper's path on its last line; point VHOSTLAB_QEMU at it.
# Idempotent: a root whose QEMU already runs is reused, a half-built one is
# finished. Needs root (debootstrap, chroot, mounts) and Debian's registry.
#
# Why a chroot works: the kit talks to QEMU through unix sockets, memfds
# passed over them, qtest and QMP, all of which cross a chroot unchanged once
# /tmp (where the sockets live), /dev and /proc are visible inside it.
set -euo pipefail

release=${1:?usage: $0 RELEASE [ROOT]}
root=${2:-/var/cache/vhostlab/$release}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$root"
root=$(cd "$root" && pwd)
wrapper="$root/qemu-system-x86_64"

log() { echo "debian-qemu: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "needs root (debootstrap and chroot); run it as root or with sudo"
    exit 2
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2
fi

# The mounts the wrapper needs. Each is made once and left in place: the root
# is a cache reused by later runs, and a bind mount costs nothing idle.
mount_into_root() {
    mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
    mountpoint -q "$root/dev" || mount --rbind /dev "$root/dev"
    mountpoint -q "$root/tmp" || mount --bind /tmp "$root/tmp"
}

if [ ! -x "$root/usr/bin/qemu-system-x86_64" ]; then
    if [ ! -x "$root/usr/bin/apt-get" ]; then
        log "debootstrap $release into $root (a few minutes)"
        rm -rf "$root/debootstrap"   # a run cut short leaves this behind
        debootstrap --variant=minbase "$release" "$root" "$mirror" >&2
    fi
    mount_into_root
    log "installing qemu-system-x86 in the $release root"
    chroot "$root" apt-get update -qq >&2
    chroot "$root" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2
    chroot "$root" apt-get clean
fi
mount_into_root

cat > "$wrapper.new" <<EOF
#!/bin/sh
# Runs Debian $release's QEMU inside $root (made by scripts/debian-qemu.sh).
# The working directory is kept when it exists inside the root (it does for
# anything under /tmp), so relative paths still resolve.
exec chroot "$root" /bin/sh -c 'cd "\$1" 2>/dev/null || cd /; shift; exec /usr/bin/qemu-system-x86_64 "\$@"' sh "\$PWD" "\$@"
EOF
chmod +x "$wrapper.new"
mv "$wrapper.new" "$wrapper"

"$wrapper" --version | head -n1 >&2
echo "$wrapper"
