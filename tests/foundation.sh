#!/bin/bash
# The build harness keeps its promises: checksums are enforced, the series
# is re-applied only when patches/ changed, unexported work is never thrown
# away, export is stable, and a rebuild with nothing changed compiles
# nothing.  Works on scratch copies; the real build/ and downloads/ are
# only read.  Prints TAP.
set -uo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
. "$TOP/scripts/lib.sh"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
n=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
nok() { n=$((n + 1)); echo "not ok $n - $*"; }
check() { local d=$1; shift; if "$@"; then ok "$d"; else nok "$d"; fi; }

# --- checksums -------------------------------------------------------------
mkdir -p "$TMP/dl"
cp "$DOWNLOADS/$QEMU_DSC" "$DOWNLOADS/$QEMU_DEBIAN_TAR" "$TMP/dl/"
cp "$DOWNLOADS/$QEMU_ORIG_TAR" "$TMP/dl/"
QEMU_LUKS_DOWNLOADS=$TMP/dl "$TOP/scripts/fetch" > "$TMP/fetch.log" 2>&1
check "intact cached source verifies" [ $? -eq 0 ]
printf 'X' | dd of="$TMP/dl/$QEMU_ORIG_TAR" bs=1 seek=1000 conv=notrunc status=none
QEMU_LUKS_DOWNLOADS=$TMP/dl "$TOP/scripts/fetch" > "$TMP/fetch.log" 2>&1
rc=$?
check "corrupted tarball stops the build" [ $rc -ne 0 ]
check "with a checksum error naming the file" \
    grep -q "SHA-256 mismatch for downloads/$QEMU_ORIG_TAR" "$TMP/fetch.log"

# --- series application ----------------------------------------------------
# A scratch build dir whose work tree shares objects with the real one.
B=$TMP/build P=$TMP/patches
mkdir -p "$B" "$P"
git clone -q --shared "$SRC" "$B/qemu"
cp "$PATCHES"/series "$P/"
while read -r p; do cp "$PATCHES/$p" "$P/"; done < <(series_files)
export QEMU_LUKS_BUILD=$B QEMU_LUKS_PATCHES=$P
git -C "$B/qemu" checkout -q -B master "$(git -C "$SRC" rev-parse HEAD)"
git -C "$B/qemu" config user.name test
git -C "$B/qemu" config user.email test@localhost

"$TOP/scripts/prepare" > "$TMP/prep.log" 2>&1
check "work tree matching patches/ is left alone" [ $? -eq 0 ]
head_before=$(git -C "$B/qemu" rev-parse HEAD)

# An unexported commit must never be thrown away.
echo "/* local */" >> "$B/qemu/README.rst"
git -C "$B/qemu" commit -q -am "local work"
mine=$(git -C "$B/qemu" rev-parse HEAD)
printf '\n' >> "$P/series"; echo "# changed" >> "$P/series"
"$TOP/scripts/prepare" > "$TMP/prep.log" 2>&1
rc=$?
check "unexported commit: prepare refuses" [ $rc -ne 0 ]
check "unexported commit: refusal says why" \
    grep -q "holds work that is not in patches/" "$TMP/prep.log"
check "unexported commit: the commit is still there" \
    [ "$(git -C "$B/qemu" rev-parse HEAD)" = "$mine" ]

# Export is stable: twice in a row, byte-identical.
"$TOP/scripts/export" > /dev/null 2>&1 && cp -r "$P" "$TMP/export1"
"$TOP/scripts/export" > /dev/null 2>&1
check "export twice gives identical files" diff -r "$TMP/export1" "$P"
check "exported files carry no commit hash" \
    bash -c "! grep -h '^From [0-9a-f]' $P/*.patch | grep -qv '^From 0\{40\} '"
"$TOP/scripts/prepare" > "$TMP/prep.log" 2>&1
check "after export, prepare accepts the tree" [ $? -eq 0 ]

# patches/ changed upstream (say by a pull): applied afresh.
last=$(tail -n 1 "$P/series")
sed -i '$d' "$P/series"
rm -f "$P/$last"
"$TOP/scripts/prepare" > "$TMP/prep.log" 2>&1
check "changed patches/ is applied afresh" [ $? -eq 0 ]
check "the dropped commit is gone from the tree" \
    [ "$(git -C "$B/qemu" rev-parse HEAD^{tree})" = \
      "$(git -C "$B/qemu" rev-parse "$head_before^{tree}")" ]
head_now=$(git -C "$B/qemu" rev-parse HEAD)
"$TOP/scripts/prepare" > "$TMP/prep.log" 2>&1
check "re-running with nothing changed changes nothing" \
    [ "$(git -C "$B/qemu" rev-parse HEAD)" = "$head_now" ]
unset QEMU_LUKS_BUILD QEMU_LUKS_PATCHES

# --- no-op rebuild ----------------------------------------------------------
# The test command runs after the build command: building again must
# recompile nothing and take well under a minute.
start=$(date +%s)
"$TOP/scripts/build" > "$TMP/build.log" 2>&1
rc=$? secs=$(( $(date +%s) - start ))
check "second build succeeds" [ $rc -eq 0 ]
check "second build takes under a minute (${secs}s)" [ $secs -lt 60 ]
check "second build compiles and links nothing" \
    bash -c "! grep -E 'Compiling|Linking' '$OBJ/ninja.log'"

echo "1..$n"
