#!/bin/bash
# Build the tiny Linux guest of tests/guest-e2e.sh, cached in build/guest/:
#   build/guest/vmlinuz     the kernel of Debian's linux-image-*-amd64
#   build/guest/initrd.img  busybox (busybox-static), the virtio modules of
#                           that kernel and tests/guest/init, as a newc cpio
# The .debs are fetched with `apt-get download` into build/guest/debs and
# unpacked with `dpkg -x`; nothing is installed.  A second run with nothing
# changed (same package versions, same init, same script) does nothing.
# Prints the two paths, one per line, on success.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$TOP/tests/guest
OUT=${QEMU_LUKS_GUEST:-$TOP/build/guest}
DEBS=$OUT/debs
# The modules the guest loads, in this order (see tests/guest/init).
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"

die() { printf 'build-guest: error: %s\n' "$*" >&2; exit 1; }
msg() { printf 'build-guest: %s\n' "$*" >&2; }

for t in apt-get apt-cache dpkg dpkg-deb cpio gzip sha256sum; do
    command -v "$t" > /dev/null || die "$t is missing (package cpio for cpio)"
done
mkdir -p "$DEBS"
exec 9> "$OUT/.lock"
flock -w 600 9 || die "another build-guest holds $OUT/.lock"

# deb_of PKG GLOB: the cached .deb of PKG's candidate version, downloaded
# if missing; other cached .debs matching GLOB (older versions) are then
# removed.  Without apt lists (no candidate), falls back to a cached .deb.
# Returns non-zero (after saying why) if the download fails.
deb_of() {
    local pkg=$1 glob=$2 ver f
    ver=$(apt-cache policy "$pkg" 2> /dev/null | awk '/Candidate:/ {print $2}')
    if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
        f=$(find "$DEBS" -name "${pkg}_*.deb" | sort | tail -n 1)
        [ -n "$f" ] || { msg "no candidate for $pkg in apt's lists"; return 1; }
        echo "$f"; return
    fi
    f=$DEBS/${pkg}_${ver//:/%3a}_amd64.deb
    if [ ! -s "$f" ]; then
        msg "downloading $pkg $ver"
        # apt-get download writes into the current directory; as root it
        # warns that _apt can't write there, which is harmless.
        if ! (cd "$DEBS" && apt-get download -q "$pkg=$ver") > "$DEBS/download.log" 2>&1 ||
           [ ! -s "$f" ]; then
            sed 's/^/  /' "$DEBS/download.log" >&2
            msg "apt-get download $pkg=$ver failed"
            return 1
        fi
        find "$DEBS" -name "$glob" ! -path "$f" -delete
    fi
    echo "$f"
}

# The kernel package the metapackage points at today, and busybox.
fetch() {
    kpkg=$(apt-cache depends linux-image-amd64 2> /dev/null |
           sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1)
    if [ -z "$kpkg" ]; then
        kpkg=$(find "$DEBS" -name 'linux-image-[0-9]*-amd64_*.deb' -printf '%f\n' |
               sort | tail -n 1 | cut -d_ -f1)
        [ -n "$kpkg" ] || { msg "apt knows no linux-image-amd64"; return 1; }
    fi
    kdeb=$(deb_of "$kpkg" 'linux-image-[0-9]*-amd64_*.deb') &&
    bdeb=$(deb_of busybox-static 'busybox-static_*.deb')
}
# Stale apt lists name versions the mirror no longer has: update, retry.
if ! fetch; then
    [ "$(id -u)" -eq 0 ] || die "can't fetch the packages (run apt-get update as root)"
    msg "running apt-get update and trying again"
    apt-get update -q > "$DEBS/update.log" 2>&1 ||
        { cat "$DEBS/update.log" >&2; die "apt-get update failed"; }
    fetch || die "can't fetch the kernel and busybox packages"
fi

key=$( { sha256sum "$HERE/init" "$0" | cut -d' ' -f1; basename "$kdeb"; basename "$bdeb"; } |
       sha256sum | cut -d' ' -f1)
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] &&
   [ "$(cat "$OUT/stamp" 2> /dev/null)" = "$key" ]; then
    printf '%s\n%s\n' "$OUT/vmlinuz" "$OUT/initrd.img"
    exit 0
fi

msg "building the guest from $(basename "$kdeb") and $(basename "$bdeb")"
WORK=$(mktemp -d "$OUT/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
dpkg -x "$kdeb" "$WORK/kernel"
dpkg -x "$bdeb" "$WORK/busybox"

root=$WORK/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$WORK/busybox/bin/busybox" "$root/bin/busybox"
cp "$HERE/init" "$root/init"
chmod 755 "$root/init" "$root/bin/busybox"
kver=$(ls "$WORK/kernel/lib/modules")
[ "$(echo "$kver" | wc -l)" -eq 1 ] || die "unexpected module trees: $kver"
for m in $MODULES; do
    ko=$(find "$WORK/kernel/lib/modules/$kver" -name "$m.ko" -o -name "$m.ko.xz" | head -n 1)
    if [ -z "$ko" ]; then
        grep -q "/$m.ko\$" "$WORK/kernel/lib/modules/$kver/modules.builtin" ||
            die "$m is neither a module nor built into $kver"
        msg "$m is built into the kernel"
        continue
    fi
    case $ko in
        *.xz) xz -dc "$ko" > "$root/lib/modules/$m.ko" ;;
        *) cp "$ko" "$root/lib/modules/$m.ko" ;;
    esac
done
echo "$kver" > "$root/kernel-version"

find "$root" -exec touch -h -d @0 {} +   # same inputs, same bytes
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --quiet -o -H newc --reproducible -R 0:0) | gzip -9n > "$WORK/initrd.img"
cp "$WORK/kernel/boot/vmlinuz-$kver" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initrd.img" "$OUT/initrd.img"
echo "$key" > "$OUT/stamp"
msg "guest ready: kernel $kver"
printf '%s\n%s\n' "$OUT/vmlinuz" "$OUT/initrd.img"
