#!/bin/bash
# The detached-header commands as users type them (the README's and the
# docs' walkthrough), run with the binaries of build/obj, human output
# checked.  Prints TAP.
set -uo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
. "$TOP/scripts/lib.sh"
export PATH=$OBJ:$PATH

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP" || exit 1
n=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
nok() { n=$((n + 1)); echo "not ok $n - $*"; }
check() { local d=$1; shift; if "$@"; then ok "$d"; else nok "$d"; fi; }
# contains FILE PYTHON-BYTES-EXPR: does FILE hold these bytes?
contains() {
    /usr/bin/python3 -c "import sys; sys.exit(0 if ($2) in open('$1', 'rb').read() else 1)"
}
lacks() { ! contains "$@"; }
has() { grep -qF -- "$2" "$1" || { echo "# '$2' not in $1:"; sed 's/^/#   /' "$1"; false; }; }

SEC='secret,id=sec0,data=abc123'
spec() {  # spec PAYLOAD-JSON [extra members]
    printf 'json:{"driver":"luks","key-secret":"sec0","file":%s,"header":{"filename":"test-header.img"}%s}' \
        "$1" "${2:-}"
}
QCOW2='{"driver":"qcow2","file":{"filename":"test-payload.qcow2"}}'
RAW='{"filename":"test-payload.raw"}'

# 1. Create, as written (iter-time kept short only where we add keys).
qemu-img create --object secret,id=sec0,data=abc123 -f luks \
    -o cipher-alg=aes-256,cipher-mode=xts -o key-secret=sec0 \
    -o detached-header=true test-header.img > create.log 2>&1
check "qemu-img create -o detached-header=true without a size" [ $? -eq 0 ]
sz=$(stat -c %s test-header.img)
check "the header file exists and is about 2 MiB" \
    [ "$sz" -gt 1000000 -a "$sz" -lt 4000000 ]
qemu-img create -f qcow2 test-payload.qcow2 200G > /dev/null 2>&1
check "qemu-img create the qcow2 payload" [ $? -eq 0 ]

# 2. The info call naming the qcow2 file directly: refused, fix named.
qemu-img info 'json:{"driver":"luks","file":{"filename":"test-payload.qcow2"},"header":{"filename":"test-header.img"}}' \
    > trap.log 2>&1
rc=$?
check "info on the qcow2 file's bytes fails" [ $rc -ne 0 ]
check "and says it is a qcow2 image" has trap.log "starts with a qcow2 header"
check "and names the fix" has trap.log '"file": {"driver": "qcow2", "file": ...}'
check "and never reports the file length as the size" \
    bash -c "! grep -q 'virtual size' trap.log"

# 3. With a qcow2 format node: 200 GiB, detached header.
qemu-img info 'json:{"driver":"luks","file":{"driver":"qcow2","file":{"filename":"test-payload.qcow2"}},"header":{"filename":"test-header.img"}}' \
    > info.log 2>&1
check "info through a qcow2 node succeeds" [ $? -eq 0 ]
check "virtual size is 200 GiB" has info.log "virtual size: 200 GiB (214748364800 bytes)"
check "detached header: true" has info.log "detached header: true"
check "payload offset: 0" has info.log "payload offset: 0"
check "the image's name includes the header (json: filename)" \
    has info.log 'image: json:{"header": {"driver": "file", "filename": "test-header.img"}'

# 4. qemu-io through the layering: qcow2 and raw payloads, survive reopen.
truncate -s 64M test-payload.raw
for p in QCOW2 RAW; do
    s=$(spec "${!p}")
    qemu-io --object $SEC -c 'write -P 0xa5 0 1M' -c 'write -P 0x5a 32M 64k' \
        "$s" > io.log 2>&1
    check "$p payload: qemu-io writes" [ $? -eq 0 ]
    qemu-io --object $SEC -c 'read -P 0xa5 0 1M' -c 'read -P 0x5a 32M 64k' \
        "$s" > io.log 2>&1
    check "$p payload: reopened, the data reads back" \
        bash -c "[ $? -eq 0 ] && ! grep -q 'Pattern verification failed' io.log"
done
truncate -s 1M control.raw
qemu-io -f raw -c 'write -P 0xa5 0 64k' control.raw > /dev/null 2>&1
check "(control) plaintext written unencrypted is found" \
    contains control.raw "b'\xa5' * 512"
check "the raw payload holds no plaintext" \
    lacks test-payload.raw "b'\xa5' * 512"
check "the raw payload holds no LUKS magic" \
    lacks test-payload.raw "b'LUKS\xba\xbe'"
qemu-img check test-payload.qcow2 > check.log 2>&1
check "the qcow2 payload stays consistent" has check.log "No errors were found on the image."

# 5. The header alone: inspectable, empty, not writable.
qemu-img info test-header.img > hdr.log 2>&1
check "qemu-img info on the header alone" has hdr.log "detached header: true"
check "the header alone has no size" has hdr.log "virtual size: 0 B (0 bytes)"
sum=$(sha256sum test-header.img)
qemu-io --object $SEC --image-opts -c 'write 0 512' \
    "driver=luks,key-secret=sec0,file.filename=test-header.img" > w.log 2>&1
check "writing to the header alone fails" [ $? -ne 0 ]
check "and leaves it unchanged" [ "$(sha256sum test-header.img)" = "$sum" ]
# The write above is stopped by the block layer (beyond the end of an empty
# volume); resizing reaches the luks driver's own refusal.
qemu-img resize --object $SEC --image-opts \
    "driver=luks,key-secret=sec0,file.filename=test-header.img" +1M > rs.log 2>&1
check "resizing the header alone fails" [ $? -ne 0 ]
check "saying why" has rs.log "Cannot resize a detached LUKS header opened without its payload"
check "and leaves it unchanged" [ "$(sha256sum test-header.img)" = "$sum" ]
# Held open read-write on its own, the header takes no write lock, so a
# volume that uses it as its header still opens.
(sleep 12 | qemu-io --object $SEC --image-opts \
    "driver=luks,key-secret=sec0,file.filename=test-header.img" > /dev/null 2>&1) &
holder=$!
sleep 5  # time enough for the holder to unlock the key slot
qemu-io --object $SEC -c 'read -P 0xa5 0 64k' "$(spec "$RAW")" > lock.log 2>&1
check "a header held open alone still serves as header elsewhere" \
    bash -c "[ $? -eq 0 ] && ! grep -q 'Pattern verification failed' lock.log" ||
    sed 's/^/#   /' lock.log
wait $holder

# 6. Bad input: clear errors, nothing written.
cp test-header.img good-header.img
head -c 4096 good-header.img > short-header.img
dd if=/dev/urandom of=random-header.img bs=1M count=2 status=none
sums() { sha256sum test-header.img test-payload.raw short-header.img random-header.img; }
before=$(sums)
try() {  # try DESC EXPECTED-TEXT QEMU-IO-ARGS...
    local desc=$1 text=$2
    shift 2
    qemu-io "$@" -c 'write -P 0xee 0 4k' > bad.log 2>&1
    check "$desc: fails" [ $? -ne 0 ]
    check "$desc: says '$text'" has bad.log "$text"
}
try "wrong passphrase" "Invalid password, cannot unlock any keyslot" \
    --object secret,id=sec0,data=wrong "$(spec "$RAW")"
try "missing header file" "Could not open 'nonexistent.img'" --object $SEC \
    "json:{\"driver\":\"luks\",\"key-secret\":\"sec0\",\"file\":$RAW,\"header\":{\"filename\":\"nonexistent.img\"}}"
try "header that is not LUKS" "Volume is not in LUKS format" --object $SEC \
    "json:{\"driver\":\"luks\",\"key-secret\":\"sec0\",\"file\":$RAW,\"header\":{\"filename\":\"random-header.img\"}}"
try "truncated header" "Encryption header is truncated" --object $SEC \
    "json:{\"driver\":\"luks\",\"key-secret\":\"sec0\",\"file\":$RAW,\"header\":{\"filename\":\"short-header.img\"}}"
check "bad input left every file byte-identical" [ "$(sums)" = "$before" ]

echo "1..$n"
