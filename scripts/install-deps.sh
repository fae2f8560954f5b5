#!/usr/bin/env bash
# Installs what hexz's sandbox, tests and benchmarks use, on Debian 12 as root:
# QEMU (as a pair matching the installed qemu-utils, see ../shared/ENVIRONMENT.md),
# busybox-static (the guest's shell), binutils (strips the guest binaries), FUSE 3, git,
# the NBD clients, an OCI registry with skopeo, htpasswd and openssl (the registry tests;
# openssl signs the Bearer tokens), the musl target and musl-gcc (static guest binaries; the
# daemon's allocator, mimalloc, is C) and vhost-device-vsock (vsock
# for QEMU on hosts without /dev/vhost-vsock). Does nothing that is already done.
set -euo pipefail

PKGS=(qemu-system-x86 busybox-static binutils cpio kmod fuse3 git
      libnbd-bin nbdkit python3-libnbd e2fsprogs
      docker-registry skopeo apache2-utils openssl musl-tools)

missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  # Debian 12's QEMU refuses to sit beside this image's newer qemu-utils: install both
  # at QEMU's version.
  V=$(apt-cache madison qemu-system-x86 | awk '{print $3; exit}')
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    --allow-downgrades "${missing[@]}" "qemu-utils=$V" >/dev/null
fi

if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  echo "install-deps: rustup target add x86_64-unknown-linux-musl"
  rustup target add x86_64-unknown-linux-musl >/dev/null
fi

if ! command -v vhost-device-vsock >/dev/null 2>&1; then
  echo "install-deps: cargo install vhost-device-vsock 0.3.0 (about a minute)"
  cargo install vhost-device-vsock --version 0.3.0 --locked --quiet
fi
