#!/bin/bash
# LUKS1 detached headers between QEMU (build/obj) and cryptsetup, both
# ways; recovery from header backups; LUKS2 refused; bad input refused
# without writing a byte.  See tests/INTEROP.md for the resulting table.
#
# cryptsetup can't map devices here (no device-mapper), so the data path
# is checked with an independent AES implementation (tests/lib/luks1.py,
# Debian's python3-cryptography) keyed with the volume key that
# `cryptsetup luksDump --dump-volume-key` reveals.  Prints TAP.
set -uo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
. "$TOP/scripts/lib.sh"
QIMG=$OBJ/qemu-img
QIO=$OBJ/qemu-io
PY=/usr/bin/python3                 # Debian's, with python3-cryptography
LUKS1=$TOP/tests/lib/luks1.py

TMP=$(mktemp -d)
trap 'cd /; rm -rf "$TMP"' EXIT
cd "$TMP" || exit 1

n=0 failed=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
nok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $*"; }
check() { local d=$1; shift; if "$@"; then ok "$d"; else nok "$d"; return 1; fi; }
show() { sed 's/^/#   /' "$1"; }
has() { grep -qF -- "$2" "$1" || { echo "# '$2' not in $1:"; show "$1"; false; }; }
hasre() { grep -qE -- "$2" "$1" || { echo "# /$2/ not in $1:"; show "$1"; false; }; }
same() { cmp -s "$1" "$2" || { echo "# $1 and $2 differ"; false; }; }
differ() { ! cmp -s "$1" "$2" || { echo "# $1 and $2 are identical"; false; }; }
# Every external command runs under a time limit: the suite never hangs.
t() { timeout -k 5 60 "$@"; }
sum() { if [ -e "$1" ]; then sha256sum < "$1" | cut -d' ' -f1; else echo absent; fi; }
sums() { local f; for f; do printf '%s=%s ' "$f" "$(sum "$f")"; done; }

# --- prerequisites -----------------------------------------------------------
missing=
for x in "$QIMG" "$QIO"; do [ -x "$x" ] || missing+=" $x"; done
command -v cryptsetup > /dev/null || missing+=" cryptsetup (cryptsetup-bin)"
"$PY" -c 'import cryptography' 2> /dev/null || missing+=" python3-cryptography"
if [ -n "$missing" ]; then
    nok "prerequisites present: missing$missing"
    echo "1..$n"
    exit 1
fi

# Passphrases, as key files (no trailing newline: cryptsetup hashes the
# whole file, and QEMU's file= secrets read it verbatim).
printf 'first passphrase' > key1
printf 'second passphrase' > key2
printf 'third passphrase' > key3
printf 'not the passphrase' > wrong
# cryptsetup: no prompts, the minimum PBKDF2 work (this is a test).
CS=(cryptsetup --batch-mode)
FAST=(--pbkdf-force-iterations 1000)
MIB=1048576

spec() {  # spec PAYLOAD HEADER: a luks node with a detached header
    local p=$1 h=$2
    [[ $p == \{* ]] || p="{\"filename\":\"$p\"}"
    [[ $h == \{* ]] || h="{\"filename\":\"$h\"}"
    printf 'json:{"driver":"luks","key-secret":"sec0","file":%s,"header":%s}' "$p" "$h"
}
aspec() {  # aspec IMAGE: a luks node with the header in the image
    printf 'json:{"driver":"luks","key-secret":"sec0","file":{"filename":"%s"}}' "$1"
}
# The whole volume, decrypted by QEMU: qread KEYFILE SPEC OUT
qread() { t "$QIMG" convert -O raw --object "secret,id=sec0,file=$1" "$2" "$3"; }
# QEMU encrypts the file PLAIN over the volume: qwrite KEYFILE PLAIN SPEC
qwrite() { t "$QIMG" convert -n -O luks --object "secret,id=sec0,file=$1" "$2" "$3"; }
# QEMU makes a detached header: qcreate KEYFILE HEADER [-o options]
qcreate() {
    local key=$1 hdr=$2
    shift 2
    t "$QIMG" create --object "secret,id=sec0,file=$key" -f luks \
        -o key-secret=sec0,iter-time=10 -o detached-header=true "$@" "$hdr"
}
# The volume key as hex, as cryptsetup reveals it: vkey HEADER KEYFILE
vkey() {
    t "${CS[@]}" luksDump --dump-volume-key --key-file "$2" "$1" |
        "$PY" "$LUKS1" mkhex
}
# Independent payload encryption: xenc MODE KEY PLAIN PAYLOAD [OFFSET]
xenc() { "$PY" "$LUKS1" encrypt "$1" "$2" "$3" "$4" "${5:-0}"; }
# and decryption: xdec MODE KEY PAYLOAD LENGTH OUT [OFFSET]
xdec() { "$PY" "$LUKS1" decrypt "$1" "$2" "$3" "${6:-0}" "$4" "$5"; }
testpass() {  # testpass HEADER PAYLOAD KEYFILE
    t "${CS[@]}" open --test-passphrase --header "$1" "$2" --key-file "$3" \
        > testpass.log 2>&1
}

"$PY" "$LUKS1" selftest > selftest.log 2>&1
check "the independent AES-XTS-plain64 passes IEEE 1619 vector 2" [ $? -eq 0 ] ||
    show selftest.log

head -c $MIB /dev/urandom > plain1
head -c $MIB /dev/urandom > plain2

# --- both directions, per cipher combination -----------------------------------
# name | cryptsetup luksFormat options | qemu-img create options |
# LUKS cipher mode | MK bits | hash | lines qemu-img info must show
# The first combination passes no cipher options at all: each side's
# defaults, which must agree.
COMBOS=(
"aes-256-xts-plain64/sha256 (both defaults)|||xts-plain64|512|sha256|cipher alg: aes-256;cipher mode: xts;ivgen alg: plain64;hash alg: sha256"
"aes-128-xts-plain64/sha512|--cipher aes-xts-plain64 --key-size 256 --hash sha512|cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha512|xts-plain64|256|sha512|cipher alg: aes-128;cipher mode: xts;ivgen alg: plain64;hash alg: sha512"
"aes-256-cbc-essiv:sha256/sha1|--cipher aes-cbc-essiv:sha256 --key-size 256 --hash sha1|cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1|cbc-essiv:sha256|256|sha1|cipher alg: aes-256;cipher mode: cbc;ivgen alg: essiv;ivgen hash alg: sha256;hash alg: sha1"
)

i=0
for combo in "${COMBOS[@]}"; do
    i=$((i + 1))
    IFS='|' read -r name csopts qopts mode bits hash infos <<< "$combo"
    # shellcheck disable=SC2206
    csargs=($csopts)
    qargs=()
    [ -n "$qopts" ] && qargs=(-o "$qopts")

    # cryptsetup -> QEMU
    h=cs$i.hdr p=cs$i.raw
    truncate -s $MIB $p
    t "${CS[@]}" luksFormat --type luks1 "${FAST[@]}" "${csargs[@]}" \
        --key-file key1 --header $h $p > fmt.log 2>&1
    check "cs->qemu $name: cryptsetup luksFormat --type luks1 --header" [ $? -eq 0 ]
    t "$QIMG" info "$(spec $p $h)" > info.log 2>&1
    check "cs->qemu $name: qemu-img info opens it as a detached header" \
        has info.log "detached header: true"
    check "cs->qemu $name: with payload offset 0" has info.log "payload offset: 0"
    good=true
    IFS=';' read -ra want <<< "$infos"
    for w in "${want[@]}"; do has info.log "    $w" || good=false; done
    check "cs->qemu $name: qemu-img info shows the cipher and hash" $good
    key=$(vkey $h key1)
    check "cs->qemu $name: cryptsetup dumps a $bits-bit volume key" \
        [ ${#key} -eq $((bits / 4)) ]
    hsum=$(sum $h)
    xenc "$mode" "$key" plain1 $p
    qread key1 "$(spec $p $h)" out.raw > io.log 2>&1
    check "cs->qemu $name: QEMU decrypts what the independent AES wrote" \
        same out.raw plain1
    qwrite key1 plain2 "$(spec $p $h)" > io.log 2>&1
    xdec "$mode" "$key" $p $MIB out.raw
    check "cs->qemu $name: the independent AES decrypts what QEMU wrote" \
        same out.raw plain2
    check "cs->qemu $name: QEMU's I/O left cryptsetup's header untouched" \
        [ "$(sum $h)" = "$hsum" ]

    # QEMU -> cryptsetup
    h=q$i.hdr p=q$i.raw
    truncate -s $MIB $p
    qcreate key1 $h "${qargs[@]}" > fmt.log 2>&1
    check "qemu->cs $name: qemu-img create -o detached-header=true" [ $? -eq 0 ] ||
        show fmt.log
    t "${CS[@]}" luksDump $h > dump.log 2>&1
    check "qemu->cs $name: cryptsetup luksDump reads it" [ $? -eq 0 ]
    good=true
    for w in "Version:       	1" "Payload offset:	0" "Cipher name:   	aes" \
             "Cipher mode:   	$mode" "Hash spec:     	$hash" "MK bits:       	$bits"; do
        has dump.log "$w" || good=false
    done
    check "qemu->cs $name: luksDump: LUKS1, payload offset 0, $mode, $hash, $bits bits" $good
    testpass $h $p key1
    check "qemu->cs $name: cryptsetup open --test-passphrase accepts the passphrase" \
        [ $? -eq 0 ]
    testpass $h $p wrong
    check "qemu->cs $name: and refuses a wrong one" [ $? -ne 0 ]
    qwrite key1 plain1 "$(spec $p $h)" > io.log 2>&1
    check "qemu->cs $name: QEMU writes the payload" [ $? -eq 0 ]
    key=$(vkey $h key1)
    xdec "$mode" "$key" $p $MIB out.raw
    check "qemu->cs $name: cryptsetup's volume key decrypts what QEMU wrote" \
        same out.raw plain1
    xenc "$mode" "$key" plain2 $p
    qread key1 "$(spec $p $h)" out.raw > io.log 2>&1
    check "qemu->cs $name: QEMU decrypts what the independent AES wrote" \
        same out.raw plain2
done

# A cryptsetup detached header with a payload offset (--offset): QEMU
# reads the payload from there.
truncate -s $((3 * MIB)) cso.raw
t "${CS[@]}" luksFormat --type luks1 "${FAST[@]}" --offset 4096 \
    --key-file key1 --header cso.hdr cso.raw > fmt.log 2>&1
check "cs->qemu --offset 4096: cryptsetup luksFormat" [ $? -eq 0 ]
t "$QIMG" info "$(spec cso.raw cso.hdr)" > info.log 2>&1
check "cs->qemu --offset 4096: QEMU sees payload offset 2 MiB and a 1 MiB volume" \
    bash -c "grep -qF 'payload offset: 2097152' info.log &&
             grep -qF 'virtual size: 1 MiB (1048576 bytes)' info.log" || show info.log
xenc xts-plain64 "$(vkey cso.hdr key1)" plain1 cso.raw $((2 * MIB))
qread key1 "$(spec cso.raw cso.hdr)" out.raw > io.log 2>&1
check "cs->qemu --offset 4096: QEMU decrypts the payload at that offset" \
    same out.raw plain1

# --- keyslots, both ways (on the default QEMU header q1.hdr) -------------------
# Keep pristine copies for the bad-input cases below.
cp q1.hdr base.hdr
cp q1.raw data.raw
cp plain2 data.plain      # what data.raw holds, through base.hdr

psum=$(sum q1.raw)
t "$QIMG" amend --object secret,id=sec0,file=key1 --object secret,id=sec1,file=key2 \
    -o state=active,new-secret=sec1,iter-time=10 "$(spec q1.raw q1.hdr)" > amend.log 2>&1
check "amend: qemu-img amend adds a key (header + payload spec)" [ $? -eq 0 ] ||
    show amend.log
t "${CS[@]}" luksDump q1.hdr > dump.log 2>&1
check "amend: luksDump shows key slot 1 enabled" has dump.log "Key Slot 1: ENABLED"
testpass q1.hdr q1.raw key2
check "amend: cryptsetup --test-passphrase accepts the added passphrase" [ $? -eq 0 ]
t "$QIMG" amend --object secret,id=sec0,file=key2 --object secret,id=old,file=key1 \
    -o state=inactive,old-secret=old \
    'json:{"driver":"luks","key-secret":"sec0","file":{"filename":"q1.hdr"}}' > amend.log 2>&1
check "amend: qemu-img amend on the header alone erases the first key" [ $? -eq 0 ] ||
    show amend.log
t "${CS[@]}" luksDump q1.hdr > dump.log 2>&1
check "amend: luksDump shows key slot 0 disabled" has dump.log "Key Slot 0: DISABLED"
testpass q1.hdr q1.raw key1
rc=$?
check "amend: cryptsetup --test-passphrase refuses the erased passphrase" \
    bash -c "[ $rc -ne 0 ] && grep -qF 'No key available with this passphrase' testpass.log" ||
    show testpass.log
testpass q1.hdr q1.raw key2
check "amend: and still accepts the remaining one" [ $? -eq 0 ]
check "amend: qemu-img amend never touched the payload" [ "$(sum q1.raw)" = "$psum" ]
t "${CS[@]}" luksAddKey "${FAST[@]}" --key-file key2 q1.hdr key3 > add.log 2>&1
check "cryptsetup luksAddKey on a QEMU header" [ $? -eq 0 ] || show add.log
qread key3 "$(spec q1.raw q1.hdr)" out.raw > io.log 2>&1
check "QEMU unlocks with the key cryptsetup added, same data" same out.raw plain2
t "${CS[@]}" luksKillSlot --key-file key3 q1.hdr 1 > kill.log 2>&1
check "cryptsetup luksKillSlot of the slot qemu-img added" [ $? -eq 0 ] || show kill.log
t "$QIO" --object secret,id=sec0,file=key2 -r -c 'read 0 512' "$(spec q1.raw q1.hdr)" \
    > io.log 2>&1
check "QEMU refuses the passphrase of the killed slot" \
    has io.log "Invalid password, cannot unlock any keyslot"
check "the payload is still unchanged" [ "$(sum q1.raw)" = "$psum" ]

# qemu-img amend on a header cryptsetup made.
t "$QIMG" amend --object secret,id=sec0,file=key1 --object secret,id=sec1,file=key2 \
    -o state=active,new-secret=sec1,iter-time=10 \
    'json:{"driver":"luks","key-secret":"sec0","file":{"filename":"cs1.hdr"}}' > amend.log 2>&1
check "qemu-img amend adds a key to a cryptsetup header" [ $? -eq 0 ] || show amend.log
t "${CS[@]}" luksDump cs1.hdr > dump.log 2>&1
testpass cs1.hdr cs1.raw key2
check "cryptsetup sees it in slot 1 and accepts it" \
    bash -c "[ $? -eq 0 ] && grep -qF 'Key Slot 1: ENABLED' dump.log" || show dump.log

# --- recovery from a header backup ---------------------------------------------
# (a) cryptsetup luksHeaderBackup of an attached cryptsetup volume.
truncate -s $((4 * MIB)) att.img
t "${CS[@]}" luksFormat --type luks1 "${FAST[@]}" --key-file key1 att.img > fmt.log 2>&1
off=$(t "${CS[@]}" luksDump att.img | awk '/^Payload offset:/ {print $3}')
check "recovery/luksHeaderBackup: attached LUKS1 volume, payload offset $off sectors" \
    [ "${off:-0}" -gt 0 ]
size=$((4 * MIB - off * 512))
head -c $size /dev/urandom > plainR
qwrite key1 plainR "$(aspec att.img)" > io.log 2>&1
check "recovery/luksHeaderBackup: QEMU writes the attached volume" [ $? -eq 0 ]
t "${CS[@]}" luksHeaderBackup att.img --header-backup-file att.bak > bak.log 2>&1
check "recovery/luksHeaderBackup: cryptsetup luksHeaderBackup" [ $? -eq 0 ]
dd if=/dev/zero of=att.img bs=512 count="$off" conv=notrunc status=none
t "$QIO" --object secret,id=sec0,file=key1 -r -c 'read 0 512' "$(aspec att.img)" > io.log 2>&1
check "recovery/luksHeaderBackup: with its header zeroed the image no longer opens" \
    has io.log "Volume is not in LUKS format"
bsum=$(sum att.bak)
qread key1 "$(spec att.img att.bak)" out.raw > io.log 2>&1
check "recovery/luksHeaderBackup: the backup as detached header reads the right data" \
    same out.raw plainR
check "recovery/luksHeaderBackup: the backup is left untouched" [ "$(sum att.bak)" = "$bsum" ]
t "${CS[@]}" luksHeaderRestore att.img --header-backup-file att.bak > res.log 2>&1
qread key1 "$(aspec att.img)" out.raw > io.log 2>&1
check "recovery/luksHeaderBackup: after luksHeaderRestore the image opens again" \
    same out.raw plainR

# (b) the first payload-offset bytes of an attached image qemu-img made.
t "$QIMG" create --object secret,id=sec0,file=key1 -f luks \
    -o key-secret=sec0,iter-time=10 qatt.img 2M > fmt.log 2>&1
check "recovery/qemu-img image: qemu-img create -f luks (attached)" [ $? -eq 0 ]
t "$QIMG" info qatt.img > info.log 2>&1
off=$(awk '/payload offset:/ {print $3}' info.log)
check "recovery/qemu-img image: payload offset $off bytes" [ "${off:-0}" -gt 0 ]
head -c $((2 * MIB)) /dev/urandom > plainQ
qwrite key1 plainQ "$(aspec qatt.img)" > io.log 2>&1
check "recovery/qemu-img image: QEMU writes it" [ $? -eq 0 ]
head -c "$off" qatt.img > qatt.bak
dd if=/dev/zero of=qatt.img bs=512 count=$((off / 512)) conv=notrunc status=none
t "$QIO" --object secret,id=sec0,file=key1 -r -c 'read 0 512' "$(aspec qatt.img)" > io.log 2>&1
check "recovery/qemu-img image: with its header zeroed the image no longer opens" \
    has io.log "Volume is not in LUKS format"
t "$QIMG" info "$(spec qatt.img qatt.bak)" > info.log 2>&1
check "recovery/qemu-img image: the saved bytes open as a detached header at offset $off" \
    has info.log "payload offset: $off"
qread key1 "$(spec qatt.img qatt.bak)" out.raw > io.log 2>&1
check "recovery/qemu-img image: and read the right data" same out.raw plainQ
testpass qatt.bak qatt.img key1
check "recovery/qemu-img image: cryptsetup accepts the saved bytes as a header too" \
    [ $? -eq 0 ]

# --- bad input: refused, no crash, nothing written -----------------------------
# refuse DESC TEXT FILE... -- CMD...: CMD must fail (not by a signal or
# the time limit), print TEXT (or match the ERE after "re:"), and leave
# every FILE byte-identical (or absent if it was).
refuse() {
    local desc=$1 text=$2 files=() rc before after
    shift 2
    while [ "$1" != -- ]; do files+=("$1"); shift; done
    shift
    before=$(sums "${files[@]}")
    t "$@" > op.log 2>&1
    rc=$?
    after=$(sums "${files[@]}")
    if [ $rc -ge 1 ] && [ $rc -lt 124 ]; then
        ok "$desc: refused, exit status $rc (no crash)"
    else
        nok "$desc: refused, exit status $rc (0: accepted; 124 and up: time limit or signal)"
        show op.log
    fi
    if [[ $text == re:* ]]; then
        check "$desc: the error matches /${text#re:}/" hasre op.log "${text#re:}"
    else
        check "$desc: the error says \"$text\"" has op.log "$text"
    fi
    if [ "$before" = "$after" ]; then
        ok "$desc: header and payload byte-identical"
    else
        nok "$desc: header and payload byte-identical"
        echo "#   before: $before"
        echo "#   after:  $after"
    fi
}
# bad DESC TEXT HEADER PAYLOAD SPEC [KEYFILE]: opening SPEC read-write to
# write with qemu-io, and adding a key with qemu-img amend, are refused.
bad() {
    local desc=$1 text=$2 hdr=$3 pay=$4 spec=$5 key=${6:-key1}
    refuse "$desc (qemu-io write)" "$text" "$hdr" "$pay" -- \
        "$QIO" --object "secret,id=sec0,file=$key" -c 'write -P 0x11 0 4k' "$spec"
    refuse "$desc (qemu-img amend)" "$text" "$hdr" "$pay" -- \
        "$QIMG" amend --object "secret,id=sec0,file=$key" \
        --object secret,id=sec1,file=key2 \
        -o state=active,new-secret=sec1,iter-time=10 "$spec"
}
# A copy of the pristine QEMU header, edited: mkbad NAME [FIELD VALUE]...
mkbad() {
    local f=$1.hdr
    shift
    cp base.hdr "$f"
    while [ $# -gt 0 ]; do "$PY" "$LUKS1" set "$f" "$1" "$2"; shift 2; done
}

# Control: the same write with the intact header does reach the payload,
# so an unchanged checksum below means that nothing was written.
cp data.raw ctl.raw
psum=$(sum ctl.raw)
t "$QIO" --object secret,id=sec0,file=key1 -c 'write -P 0x11 0 4k' \
    "$(spec ctl.raw base.hdr)" > io.log 2>&1
check "control: with a sound header the same qemu-io write succeeds" [ $? -eq 0 ] ||
    show io.log
check "control: and changes the payload's checksum" [ "$(sum ctl.raw)" != "$psum" ]

bad "wrong passphrase" "Invalid password, cannot unlock any keyslot" \
    base.hdr data.raw "$(spec data.raw base.hdr)" wrong

bad "header file missing" "Could not open 'missing.hdr': No such file or directory" \
    missing.hdr data.raw "$(spec data.raw missing.hdr)"

: > empty.hdr
bad "empty header file" "Encryption header is truncated: 'empty.hdr' ends before byte 592 of the header" \
    empty.hdr data.raw "$(spec data.raw empty.hdr)"

# The LUKS1 header proper is 592 bytes; its key-slot table starts at 208.
head -c 200 base.hdr > short.hdr
bad "header truncated before the key-slot table (200 bytes)" \
    "Encryption header is truncated: 'short.hdr' ends before byte 592 of the header" \
    short.hdr data.raw "$(spec data.raw short.hdr)"

# Cut inside the table, 2 bytes short of its end.  QEMU's block layer
# knows sizes in whole 512-byte sectors, so the missing bytes read as
# zeroes and the damage shows as a corrupted key slot.
head -c 590 base.hdr > slots.hdr
bad "header truncated inside the key-slot table (590 bytes)" \
    "Keyslot 7 is corrupted (stripes 0 != 4000)" \
    slots.hdr data.raw "$(spec data.raw slots.hdr)"

# Slot 0's key material: 4000 stripes x 64 bytes from byte 4096.
head -c 131072 base.hdr > cut.hdr
bad "header truncated inside key material (128 KiB)" \
    "re:Encryption header is truncated: 'cut\.hdr' ends before byte [0-9]+ of the header" \
    cut.hdr data.raw "$(spec data.raw cut.hdr)"

# Slot 0 (the one in use) complete, the key material of slots 4-7 cut off.
head -c $MIB base.hdr > unused.hdr
bad "header truncated inside the key material of unused slots (1 MiB)" \
    "re:Encryption header is truncated: 'unused\.hdr' ends before byte [0-9]+ of the header" \
    unused.hdr data.raw "$(spec data.raw unused.hdr)"

mkbad magic magic 'LUKS\xba\xbf'
bad "bad magic" "Volume is not in LUKS format" magic.hdr data.raw "$(spec data.raw magic.hdr)"

mkbad version version 3
bad "unknown version 3" "LUKS version 3 is not supported" \
    version.hdr data.raw "$(spec data.raw version.hdr)"

mkbad overlap slot1.key-offset "$("$PY" "$LUKS1" get base.hdr slot0.key-offset)"
bad "key slots 0 and 1 overlapping" "Keyslots 0 and 1 are overlapping in the header" \
    overlap.hdr data.raw "$(spec data.raw overlap.hdr)"

mkbad stripes slot0.stripes 0
bad "stripes zero" "Keyslot 0 is corrupted (stripes 0 != 4000)" \
    stripes.hdr data.raw "$(spec data.raw stripes.hdr)"

mkbad iters slot0.iterations 0
bad "key slot iteration count zero" "Keyslot 0 iteration count is zero" \
    iters.hdr data.raw "$(spec data.raw iters.hdr)"

mkbad mkiters mk-iterations 0
bad "master key iteration count zero" "LUKS key iteration count is zero" \
    mkiters.hdr data.raw "$(spec data.raw mkiters.hdr)"

t "$QIMG" create -f qcow2 image.qcow2 1M > /dev/null 2>&1
bad "a qcow2 image given as header" "Volume is not in LUKS format" \
    image.qcow2 data.raw "$(spec data.raw image.qcow2)"

# The same file as header and payload: the payload would overwrite the
# header (offset 0), or is read in place of it.  The error must say so.
cp base.hdr both.img
bad "the same detached header file as header and payload" \
    "'both.img' is given as both the LUKS header and its payload" \
    both.img both.img "$(spec both.img both.img)"
cp qatt.bak both-att.img
truncate -s $((4 * MIB)) both-att.img
bad "the same attached image as header and payload" \
    "'both-att.img' is given as both the LUKS header and its payload" \
    both-att.img both-att.img "$(spec both-att.img both-att.img)"

# LUKS2, cryptsetup's default format: refused by name.
truncate -s $MIB l2.raw
t "${CS[@]}" luksFormat --type luks2 --pbkdf pbkdf2 "${FAST[@]}" --key-file key1 \
    --header l2.hdr l2.raw > fmt.log 2>&1
check "LUKS2: cryptsetup luksFormat --type luks2 --header" [ $? -eq 0 ]
bad "LUKS2 detached header" "LUKS version 2 is not supported" \
    l2.hdr l2.raw "$(spec l2.raw l2.hdr)"
truncate -s $((20 * MIB)) l2.img
t "${CS[@]}" luksFormat --pbkdf pbkdf2 "${FAST[@]}" --key-file key1 l2.img > fmt.log 2>&1
check "LUKS2: cryptsetup luksFormat with its defaults makes LUKS2" \
    bash -c "timeout 60 cryptsetup luksDump l2.img | grep -q '^Version:[[:space:]]*2'"
bad "LUKS2 attached image" "LUKS version 2 is not supported" \
    l2.img l2.raw "$(aspec l2.img)"

# Read-only storage during amend.  We run as root, whom a file mode
# doesn't stop: QEMU's read-only option on the header node, then mode
# 0444 with the amend run as nobody.
cp base.hdr ro.hdr
refuse "amend with the header on a read-only node" "read-only" ro.hdr data.raw -- \
    "$QIMG" amend --object secret,id=sec0,file=key1 --object secret,id=sec1,file=key2 \
    -o state=active,new-secret=sec1,iter-time=10 \
    "$(spec data.raw '{"driver":"file","filename":"ro.hdr","read-only":true}')"
check "amend with the header on a read-only node: the error names the header" \
    has op.log "ro.hdr"
refuse "amend of the header alone on a read-only node" "read-only" ro.hdr -- \
    "$QIMG" amend --object secret,id=sec0,file=key1 --object secret,id=sec1,file=key2 \
    -o state=active,new-secret=sec1,iter-time=10 \
    'json:{"driver":"luks","key-secret":"sec0","file":{"driver":"file","filename":"ro.hdr","read-only":true}}'
cp data.raw ctl.raw
t "$QIO" --object secret,id=sec0,file=key1 -c 'write -P 0x22 0 4k' -c 'read -P 0x22 0 4k' \
    "$(spec ctl.raw '{"driver":"file","filename":"ro.hdr","read-only":true}')" > io.log 2>&1
check "I/O with the header on a read-only node works" [ $? -eq 0 ] || show io.log
check "and leaves the header untouched" [ "$(sum ro.hdr)" = "$(sum base.hdr)" ]
NOBODY=(setpriv --reuid=65534 --regid=65534 --clear-groups)
if [ "$(id -u)" -eq 0 ] && command -v setpriv > /dev/null; then
    mkdir nobody
    cp base.hdr nobody/ro.hdr
    cp data.raw key1 key2 nobody/
    chmod 0755 "$TMP" nobody
    chmod 0444 nobody/ro.hdr nobody/key1 nobody/key2
    chmod 0666 nobody/data.raw
    cd nobody || exit 1
    refuse "amend as nobody, header file mode 0444" "Permission denied" ro.hdr data.raw -- \
        "${NOBODY[@]}" "$QIMG" amend --object secret,id=sec0,file=key1 \
        --object secret,id=sec1,file=key2 -o state=active,new-secret=sec1,iter-time=10 \
        "$(spec data.raw '{"filename":"ro.hdr","auto-read-only":true}')"
    check "amend as nobody, header file mode 0444: the error names the header" \
        has op.log "ro.hdr"
    cd "$TMP" || exit 1
else
    ok "amend as nobody, header file mode 0444 # SKIP needs root and setpriv"
fi

# A header from a different volume: LUKS1 can't tell (nothing in the
# header identifies the payload), so it opens and yields garbage, but
# opening it read-write and reading must not write a byte.
truncate -s $MIB scratch.raw
t "${CS[@]}" luksFormat --type luks1 "${FAST[@]}" --key-file key1 --header other.hdr \
    scratch.raw > fmt.log 2>&1
before=$(sums other.hdr data.raw)
t "$QIO" --object secret,id=sec0,file=key1 -c 'read 0 1M' "$(spec data.raw other.hdr)" \
    > io.log 2>&1
check "a header from a different volume with the same passphrase opens (undetectable in LUKS1)" \
    [ $? -eq 0 ]
qread key1 "$(spec data.raw other.hdr)" out.raw > io.log 2>&1
check "a header from a different volume: the data read is wrong" differ out.raw data.plain
check "a header from a different volume: opening it wrote nothing" \
    [ "$(sums other.hdr data.raw)" = "$before" ]
qread key1 "$(spec data.raw base.hdr)" out.raw > io.log 2>&1
check "with its own header the same payload still reads right" same out.raw data.plain

echo "1..$n"
[ "$failed" -eq 0 ]
