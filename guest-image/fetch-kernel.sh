#!/bin/sh
# mmdebstrap customize hook: download Debian's cloud kernel for the guest's arch.
# $1 = rootfs (unused), $2 = Debian arch (amd64|arm64), $3 = directory for the .deb.
# mmdebstrap exports MMDEBSTRAP_APT_CONFIG to hooks: apt then sees the guest arch's package lists.
set -eu
export APT_CONFIG="${MMDEBSTRAP_APT_CONFIG:-${APT_CONFIG:-}}"
arch=$2; dest=$3
meta=linux-image-cloud-$arch
pkg=$(apt-cache depends "$meta:$arch" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -n1)
[ -n "$pkg" ] || { echo "fetch-kernel: cannot resolve $meta" >&2; exit 1; }
pkg=${pkg%:$arch}
echo "fetch-kernel: $meta -> $pkg" >&2
mkdir -p "$dest"
cd "$dest" && apt-get download -q "$pkg:$arch" >&2
