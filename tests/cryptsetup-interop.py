#!/usr/bin/python3
"""LUKS1 detached headers between QEMU (the build under test) and
cryptsetup, both ways; recovery from header backups; bad input refused
without writing a byte.  Then LUKS2 volumes made by cryptsetup, attached
and detached, in both data directions; recovery from one bad metadata
copy; every LUKS2 refusal.  tests/INTEROP.md has the tables.

cryptsetup can't map devices here (no device-mapper), so the data path is
checked with tests/lib/luks1.py and tests/lib/luks2.py, which unlock
headers and encrypt and decrypt payloads on their own (AES from
python3-cryptography, Argon2 from python3-argon2).  Every volume key is
taken twice: from that independent unlock, and from `cryptsetup luksDump
--dump-volume-key`; the two must agree.  Prints TAP.
"""

import json
import os
import re
import shutil

import luks1
import luks2
from proc import (QEMU_IMG, QEMU_IO, MiB, missing_tools, qemu_img, qemu_io, read, remove, run,
                  scratch, sha256, sha256_data, sums, write)
from specs import read_volume, reads_back, refuses, secret, spec
from tap import check, diag, skip, tap

# What QEMU says.  The series may reword these: change them here.
EXPECT = {
    'wrong-passphrase': 'Invalid password, cannot unlock any keyslot',
    'not-luks': 'Volume is not in LUKS format',
    # An empty file: the magic and version (8 bytes) tell LUKS1 from LUKS2
    'truncated-empty': "Encryption header is truncated: '%s' ends before byte 8 of the header",
    'luks3': 'LUKS version 3 is not supported',
    'truncated': "Encryption header is truncated: '%s' ends before byte 592 of the header",
    'truncated-material': re.compile(
        r"Encryption header is truncated: '%s' ends before byte [0-9]+ of the header"),
    'slot7-stripes': 'Keyslot 7 is corrupted (stripes 0 != 4000)',
    'slot0-stripes': 'Keyslot 0 is corrupted (stripes 0 != 4000)',
    'overlap': 'Keyslots 0 and 1 are overlapping in the header',
    'slot-iterations': 'Keyslot 0 iteration count is zero',
    'mk-iterations': 'LUKS key iteration count is zero',
    'missing': "Could not open '%s': No such file or directory",
    'same-image': "'%s' is given as both the LUKS header and its payload",
    # The luks driver's own refusal to amend a header it can't write, and
    # the block layer's reason (alone, for a header opened on its own).
    'amend-read-only': "Cannot update the keys of detached LUKS header '%s': "
                       "Block node is read-only",
    'read-only': re.compile(r'^qemu-img: Block node is read-only$', re.M),
    'permission': "Could not open '%s': Permission denied",
    'open-failed': 'Could not open',
    # LUKS2
    'l2-copy': 'warning: LUKS2 header: the %s copy is %s; using the %s copy',
    'l2-both': 'LUKS2 header is damaged: primary copy: checksum mismatch; '
               'secondary copy: checksum mismatch',
    'l2-requirement': "LUKS2 volume has the mandatory requirement '%s', which QEMU does not "
                      "support",
    'l2-reencrypt': ': a reencryption is in progress or was interrupted',
    'l2-reencrypt-keyslot': 'LUKS2 keyslot %d is a reencryption keyslot: a reencryption is in '
                            'progress or was interrupted, which QEMU does not support',
    'l2-segments': 'LUKS2 volume has %d data segments, but QEMU supports only one (more appear '
                   'while a reencryption is in progress)',
    'l2-integrity': 'LUKS2 segment 0 has integrity protection (dm-integrity), which QEMU does '
                    'not support',
    'l2-linear': "LUKS2 segment 0 is of type 'linear', but QEMU supports 'crypt' only",
    'l2-sector': 'LUKS2 segment 0 has sector size %d, but only 512, 1024, 2048 and 4096 are '
                 'supported',
    'l2-kdf-limit': "LUKS2 %s, with %s, needs %d units of KDF work, more than the limit of %d "
                    "for unlocking a key\nRaise the limit with '__org.example_kdf-work-limit' "
                    "only for a header you trust.",
    'l2-argon2-memory': 'LUKS2 keyslot 0: Argon2 memory cost 4194305 KiB is above the 4194304 '
                        'KiB (4 GiB) that LUKS2 allows',
    'l2-argon2-memory-limit': "LUKS2 keyslot 0 asks Argon2 for %d KiB of memory, more than the "
                              "limit of %d KiB\nRaise the limit with "
                              "'__org.example_kdf-memory-limit' only for a header you trust.",
    'l2-no-keyslot': 'LUKS2 volume has no keyslot to try: the keyslots of its volume key are '
                     'all to be ignored (priority 0)',
    'l2-argon2-lanes': 'LUKS2 keyslot 0: Argon2 parallelism 5 is not from 1 to 4, as LUKS2 '
                       'requires',
}
CS = ['cryptsetup', '--batch-mode']
FAST = ['--pbkdf-force-iterations', '1000']       # the least PBKDF2 work
QIO = [QEMU_IO]

gone = missing_tools([QEMU_IMG, QEMU_IO], ['cryptsetup', 'setpriv'], ['cryptography', 'argon2'])
if gone:
    check(False, 'prerequisites present: missing ' + ', '.join(gone))
    tap.done()
scratch('cryptsetup-interop.')

# Passphrases as key files, no trailing newline: cryptsetup hashes the
# whole file, and QEMU's file= secrets read it verbatim.
PASS = {'key1': b'first passphrase', 'key2': b'second passphrase',
        'key3': b'third passphrase', 'wrong': b'not the passphrase'}
for name, p in PASS.items():
    write(name, p)


def cs(*args, timeout=60):
    return run(CS + list(args), timeout)


def qwrite(keyfile, plain, volume_spec):
    """QEMU encrypts the file plain over the volume."""
    return qemu_img('convert', '-n', '-O', 'luks', '--object', secret(file=keyfile),
                    plain, volume_spec)


def qcreate(keyfile, header, *opts):
    return qemu_img('create', '--object', secret(file=keyfile), '-f', 'luks',
                    '-o', 'key-secret=sec0,iter-time=10', '-o', 'detached-header=true',
                    *opts, header)


def testpass(header, payload, keyfile):
    return cs('open', '--test-passphrase', '--header', header, payload, '--key-file', keyfile)


def cs_volume_key(header, keyfile):
    """The volume key as cryptsetup reveals it (bytes), or None."""
    r = cs('luksDump', '--dump-volume-key', '--key-file', keyfile, header)
    m = re.search(r'MK dump:(.*?)(?:\n\S|\Z)', r.out, re.S)
    return bytes.fromhex(''.join(re.findall(r'\b[0-9a-f]{2}\b', m.group(1)))) if r.ok and m else None


def volume_key(what, header, keyfile, bits):
    """The volume key, from the independent unlock; checked against
    cryptsetup's.  Two TAP lines; None if the independent unlock failed."""
    try:
        slot, key = luks1.unlock(header, PASS[keyfile])
        why = 'slot %d' % slot
    except (ValueError, OSError) as e:
        key, why = None, str(e)
    check(key is not None and len(key) * 8 == bits, '%s: the independent LUKS1 code unlocks '
          'the header (%s) to a %d-bit key passing its digest check' % (what, why, bits),
          '%s bits' % (len(key) * 8) if key else why)
    theirs = cs_volume_key(header, keyfile)
    check(key is not None and theirs == key, "%s: cryptsetup's --dump-volume-key "
          'gives the same key' % what,
          'independent: %s\ncryptsetup:  %s' % (key and key.hex(), theirs and theirs.hex()))
    return key


def xcrypt(encrypt, header, key, src, dst, offset=0, length=None):
    """The independent payload encryption, with the cipher and mode of
    header: encrypt the file src into dst at byte offset, or decrypt
    length bytes at offset of src into the file dst (removed first)."""
    hdr = luks1.read_header(header)
    if encrypt:
        data = luks1.crypt(True, hdr.cipher_name, hdr.cipher_mode, key, read(src))
        with open(dst, 'r+b') as f:
            f.seek(offset)
            f.write(data)
    else:
        remove(dst)
        with open(src, 'rb') as f:
            f.seek(offset)
            data = f.read(length)
        write(dst, luks1.crypt(False, hdr.cipher_name, hdr.cipher_mode, key, data))


def same(path, want):
    return read(path) is not None and read(path) == read(want)


bad = luks1.selftest()
check(not bad, 'the independent LUKS1 code passes its known-answer tests '
      '(IEEE 1619 XTS-AES, AES-CBC-ESSIV:SHA256, CBC-plain/plain64)', '\n'.join(bad))
write('plain1', os.urandom(MiB))
write('plain2', os.urandom(MiB))


def truncate(path, size):
    with open(path, 'ab') as f:
        f.truncate(size)


# --- both directions, per cipher combination -----------------------------------
# (name, cryptsetup luksFormat options, qemu-img create options, LUKS
# cipher mode, key bits, hash, lines qemu-img info shows).  The first
# passes no cipher options: each side's defaults, which must agree.
COMBOS = [
    ('aes-256-xts-plain64/sha256 (both defaults)', [], [], 'xts-plain64', 512, 'sha256',
     ['cipher alg: aes-256', 'cipher mode: xts', 'ivgen alg: plain64', 'hash alg: sha256']),
    ('aes-128-xts-plain64/sha512', ['--cipher', 'aes-xts-plain64', '--key-size', '256',
                                    '--hash', 'sha512'],
     ['-o', 'cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha512'],
     'xts-plain64', 256, 'sha512',
     ['cipher alg: aes-128', 'cipher mode: xts', 'ivgen alg: plain64', 'hash alg: sha512']),
    ('aes-256-cbc-essiv:sha256/sha1', ['--cipher', 'aes-cbc-essiv:sha256', '--key-size', '256',
                                       '--hash', 'sha1'],
     ['-o', 'cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,'
      'hash-alg=sha1'], 'cbc-essiv:sha256', 256, 'sha1',
     ['cipher alg: aes-256', 'cipher mode: cbc', 'ivgen alg: essiv',
      'ivgen hash alg: sha256', 'hash alg: sha1']),
    # A 24-byte key: key material that doesn't end on a sector boundary
    ('aes-192-cbc-essiv:sha256/sha256', ['--cipher', 'aes-cbc-essiv:sha256',
                                         '--key-size', '192'],
     ['-o', 'cipher-alg=aes-192,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256'],
     'cbc-essiv:sha256', 192, 'sha256',
     ['cipher alg: aes-192', 'cipher mode: cbc', 'ivgen alg: essiv',
      'ivgen hash alg: sha256', 'hash alg: sha256']),
]

for i, (name, csopts, qopts, mode, bits, hash_, infos) in enumerate(COMBOS, 1):
    # cryptsetup -> QEMU
    what = 'cs->qemu ' + name
    h, p = 'cs%d.hdr' % i, 'cs%d.raw' % i
    truncate(p, MiB)
    r = cs('luksFormat', '--type', 'luks1', *FAST, *csopts, '--key-file', 'key1',
           '--header', h, p)
    check(r.ok, what + ': cryptsetup luksFormat --type luks1 --header', r)
    r = qemu_img('info', spec(p, h, key=None))
    check(r.ok and 'detached header: true' in r.out,
          what + ': qemu-img info opens it as a detached header', r)
    check('payload offset: 0' in r.out, what + ': with payload offset 0', r.out)
    check(all('    ' + w in r.out for w in infos),
          what + ': qemu-img info shows the cipher and hash', r.out)
    hdr = luks1.read_header(h)
    check((hdr.cipher_name, hdr.cipher_mode, hdr.hash_spec) == ('aes', mode, hash_)
          and hdr.key_bytes * 8 == bits and 'uuid: %s\n' % hdr.uuid in r.out,
          what + ': the independent parser reads aes, %s, %s, %d bits and the UUID '
          'qemu-img shows' % (mode, hash_, bits), str(hdr))
    key = volume_key(what, h, 'key1', bits)
    hsum = sha256(h)
    if key:
        xcrypt(True, h, key, 'plain1', p)
    reads_back(what + ': QEMU decrypts what the independent AES wrote', 'key1', spec(p, h),
               'plain1')
    r = qwrite('key1', 'plain2', spec(p, h))
    check(r.ok, what + ': QEMU writes the payload', r)
    if key:
        xcrypt(False, h, key, p, 'out.raw', 0, MiB)
    check(key and same('out.raw', 'plain2'),
          what + ': the independent AES decrypts what QEMU wrote')
    check(sha256(h) == hsum, what + ": QEMU's I/O left cryptsetup's header untouched")

    # QEMU -> cryptsetup
    what = 'qemu->cs ' + name
    h, p = 'q%d.hdr' % i, 'q%d.raw' % i
    truncate(p, MiB)
    r = qcreate('key1', h, *qopts)
    check(r.ok, what + ': qemu-img create -o detached-header=true', r)
    r = cs('luksDump', h)
    check(r.ok, what + ': cryptsetup luksDump reads it', r)
    want = ['Version:       \t1', 'Payload offset:\t0', 'Cipher name:   \taes',
            'Cipher mode:   \t' + mode, 'Hash spec:     \t' + hash_, 'MK bits:       \t%d' % bits]
    check(all(w in r.out for w in want),
          what + ': luksDump: LUKS1, payload offset 0, %s, %s, %d bits' % (mode, hash_, bits),
          r.out)
    check(testpass(h, p, 'key1').ok,
          what + ': cryptsetup open --test-passphrase accepts the passphrase')
    check(testpass(h, p, 'wrong').refused, what + ': and refuses a wrong one')
    r = qwrite('key1', 'plain1', spec(p, h))
    check(r.ok, what + ': QEMU writes the payload', r)
    key = volume_key(what, h, 'key1', bits)
    if key:
        xcrypt(False, h, key, p, 'out.raw', 0, MiB)
    check(key and same('out.raw', 'plain1'),
          what + ': the independent AES decrypts what QEMU wrote')
    if key:
        xcrypt(True, h, key, 'plain2', p)
    reads_back(what + ': QEMU decrypts what the independent AES wrote', 'key1', spec(p, h),
               'plain2')

# The independent unlock in the other modes of the specification that
# cryptsetup makes: its key must be cryptsetup's.
for mode, bits in [('xts-plain', 256), ('cbc-plain', 128), ('cbc-plain64', 256), ('ecb', 128)]:
    h = 'mode-%s.hdr' % mode
    truncate('mode.raw', MiB)
    r = cs('luksFormat', '--type', 'luks1', *FAST, '--cipher', 'aes-' + mode,
           '--key-size', str(bits), '--key-file', 'key1', '--header', h, 'mode.raw')
    check(r.ok, 'cryptsetup luksFormat aes-%s' % mode, r)
    volume_key('aes-%s (%d bits)' % (mode, bits), h, 'key1', bits)
try:
    luks1.unlock('cs1.hdr', PASS['wrong'])
    check(False, 'the independent unlock refuses a wrong passphrase')
except ValueError as e:
    check('no key slot' in str(e), 'the independent unlock refuses a wrong passphrase', str(e))

# A cryptsetup detached header with a payload offset (--offset): QEMU
# reads the payload from there.
truncate('cso.raw', 3 * MiB)
r = cs('luksFormat', '--type', 'luks1', *FAST, '--offset', '4096', '--key-file', 'key1',
       '--header', 'cso.hdr', 'cso.raw')
check(r.ok, 'cs->qemu --offset 4096: cryptsetup luksFormat', r)
r = qemu_img('info', spec('cso.raw', 'cso.hdr', key=None))
check('payload offset: 2097152' in r.out and 'virtual size: 1 MiB (1048576 bytes)' in r.out,
      'cs->qemu --offset 4096: QEMU sees payload offset 2 MiB and a 1 MiB volume', r)
check(luks1.read_header('cso.hdr').payload_offset == 4096,
      'cs->qemu --offset 4096: the independent parser reads payload offset 4096 sectors')
key = volume_key('cs->qemu --offset 4096', 'cso.hdr', 'key1', 512)
if key:
    xcrypt(True, 'cso.hdr', key, 'plain1', 'cso.raw', 2 * MiB)
reads_back('cs->qemu --offset 4096: QEMU decrypts the payload at that offset', 'key1',
           spec('cso.raw', 'cso.hdr'), 'plain1')

# --- keyslots, both ways (on the default QEMU header q1.hdr) -------------------
# Pristine copies for the bad-input cases below.
shutil.copy('q1.hdr', 'base.hdr')
shutil.copy('q1.raw', 'data.raw')
shutil.copy('plain2', 'data.plain')      # what data.raw holds, through base.hdr


def slot_of(header, keyfile):
    """The slot the independent unlock opens with this passphrase, or None."""
    try:
        return luks1.unlock(header, PASS[keyfile])[0]
    except ValueError:
        return None


psum = sha256('q1.raw')
r = qemu_img('amend', '--object', secret(file='key1'), '--object', secret('sec1', file='key2'),
             '-o', 'state=active,new-secret=sec1,iter-time=10', spec('q1.raw', 'q1.hdr'))
check(r.ok, 'amend: qemu-img amend adds a key (header + payload spec)', r)
r = cs('luksDump', 'q1.hdr')
check('Key Slot 1: ENABLED' in r.out, 'amend: luksDump shows key slot 1 enabled', r)
check(slot_of('q1.hdr', 'key2') == 1, 'amend: the independent unlock opens slot 1 with it')
check(testpass('q1.hdr', 'q1.raw', 'key2').ok,
      'amend: cryptsetup --test-passphrase accepts the added passphrase')


def key_material(path, slot):
    """The sectors of the key material of LUKS1 keyslot @slot at @path"""
    hdr = luks1.read_header(path)
    s = hdr.slots[slot]
    n = -(-hdr.key_bytes * s['stripes'] // 512)
    with open(path, 'rb') as f:
        f.seek(s['key-offset'] * 512)
        data = f.read(n * 512)
    return [data[i:i + 512] for i in range(0, len(data), 512)]


erased = key_material('q1.hdr', 0)
r = qemu_img('amend', '--object', secret(file='key2'), '--object', secret('old', file='key1'),
             '-o', 'state=inactive,old-secret=old', spec('q1.hdr'))
check(r.ok, 'amend: qemu-img amend on the header alone erases the first key', r)
after = key_material('q1.hdr', 0)
check(len(after) == len(erased) and all(x != y for x, y in zip(erased, after)),
      'amend: every sector of the erased key material was overwritten (%d sectors)' % len(erased))
r = cs('luksDump', 'q1.hdr')
check('Key Slot 0: DISABLED' in r.out, 'amend: luksDump shows key slot 0 disabled', r)
r = testpass('q1.hdr', 'q1.raw', 'key1')
check(r.refused and 'No key available with this passphrase' in r.out,
      'amend: cryptsetup --test-passphrase refuses the erased passphrase', r)
check(slot_of('q1.hdr', 'key1') is None,
      'amend: and so does the independent unlock')
check(testpass('q1.hdr', 'q1.raw', 'key2').ok, 'amend: and still accepts the remaining one')
check(sha256('q1.raw') == psum, 'amend: qemu-img amend never touched the payload')
r = cs('luksAddKey', *FAST, '--key-file', 'key2', 'q1.hdr', 'key3')
check(r.ok, 'cryptsetup luksAddKey on a QEMU header', r)
reads_back('QEMU unlocks with the key cryptsetup added, same data', 'key3',
           spec('q1.raw', 'q1.hdr'), 'plain2')
r = cs('luksKillSlot', '--key-file', 'key3', 'q1.hdr', '1')
check(r.ok, 'cryptsetup luksKillSlot of the slot qemu-img added', r)
r = qemu_io('--object', secret(file='key2'), '-r', '-c', 'read 0 512', spec('q1.raw', 'q1.hdr'))
check(r.refused and EXPECT['wrong-passphrase'] in r.out,
      'QEMU refuses the passphrase of the killed slot', r)
check(sha256('q1.raw') == psum, 'the payload is still unchanged')

# qemu-img amend on a header cryptsetup made.
r = qemu_img('amend', '--object', secret(file='key1'), '--object', secret('sec1', file='key2'),
             '-o', 'state=active,new-secret=sec1,iter-time=10', spec('cs1.hdr'))
check(r.ok, 'qemu-img amend adds a key to a cryptsetup header', r)
r = cs('luksDump', 'cs1.hdr')
check(testpass('cs1.hdr', 'cs1.raw', 'key2').ok and 'Key Slot 1: ENABLED' in r.out,
      'cryptsetup sees it in slot 1 and accepts it', r)

# --- recovery from a header backup ---------------------------------------------
# (a) cryptsetup luksHeaderBackup of an attached cryptsetup volume.
what = 'recovery/luksHeaderBackup'
truncate('att.img', 4 * MiB)
cs('luksFormat', '--type', 'luks1', *FAST, '--key-file', 'key1', 'att.img')
off = luks1.read_header('att.img').payload_offset
r = cs('luksDump', 'att.img')
check(off > 0 and re.search(r'^Payload offset:\s*%d$' % off, r.out, re.M),
      what + ': attached LUKS1 volume, payload offset %d sectors (both parsers)' % off, r)
write('plainR', os.urandom(4 * MiB - off * 512))
r = qwrite('key1', 'plainR', spec('att.img'))
check(r.ok, what + ': QEMU writes the attached volume', r)
r = cs('luksHeaderBackup', 'att.img', '--header-backup-file', 'att.bak')
check(r.ok, what + ': cryptsetup luksHeaderBackup', r)
with open('att.img', 'r+b') as f:
    f.write(bytes(off * 512))
r = qemu_io('--object', secret(file='key1'), '-r', '-c', 'read 0 512', spec('att.img'))
check(r.refused and EXPECT['not-luks'] in r.out,
      what + ': with its header zeroed the image no longer opens', r)
bsum = sha256('att.bak')
reads_back(what + ': the backup as detached header reads the right data', 'key1',
           spec('att.img', 'att.bak'), 'plainR')
check(sha256('att.bak') == bsum, what + ': the backup is left untouched')
r = cs('luksHeaderRestore', 'att.img', '--header-backup-file', 'att.bak')
check(r.ok, what + ': cryptsetup luksHeaderRestore', r)
reads_back(what + ': after luksHeaderRestore the image opens again', 'key1', spec('att.img'),
           'plainR')

# (b) the first payload-offset bytes of an attached image qemu-img made.
what = 'recovery/qemu-img image'
r = qemu_img('create', '--object', secret(file='key1'), '-f', 'luks',
             '-o', 'key-secret=sec0,iter-time=10', 'qatt.img', '2M')
check(r.ok, what + ': qemu-img create -f luks (attached)', r)
m = re.search(r'payload offset: (\d+)', qemu_img('info', 'qatt.img').out)
off = int(m.group(1)) if m else 0
check(off > 0 and off == luks1.read_header('qatt.img').payload_offset * 512,
      what + ': payload offset %d bytes (both parsers)' % off)
write('plainQ', os.urandom(2 * MiB))
r = qwrite('key1', 'plainQ', spec('qatt.img'))
check(r.ok, what + ': QEMU writes it', r)
write('qatt.bak', read('qatt.img')[:off])
with open('qatt.img', 'r+b') as f:
    f.write(bytes(off))
r = qemu_io('--object', secret(file='key1'), '-r', '-c', 'read 0 512', spec('qatt.img'))
check(r.refused and EXPECT['not-luks'] in r.out,
      what + ': with its header zeroed the image no longer opens', r)
r = qemu_img('info', spec('qatt.img', 'qatt.bak', key=None))
check('payload offset: %d' % off in r.out,
      what + ': the saved bytes open as a detached header at offset %d' % off, r)
reads_back(what + ': and read the right data', 'key1', spec('qatt.img', 'qatt.bak'), 'plainQ')
check(testpass('qatt.bak', 'qatt.img', 'key1').ok,
      what + ': cryptsetup accepts the saved bytes as a header too')

# --- bad input: refused, no crash, nothing written -----------------------------
QAMEND = [QEMU_IMG, 'amend', '--object', secret(file='key1'), '--object',
          secret('sec1', file='key2'), '-o', 'state=active,new-secret=sec1,iter-time=10']


def bad(desc, text, hdr, pay, volume_spec, keyfile='key1'):
    """Opening volume_spec read-write to write with qemu-io, and adding a
    key with qemu-img amend, are both refused (six TAP lines)."""
    refuses(desc + ' (qemu-io write)', QIO + ['--object', secret(file=keyfile),
                                             '-c', 'write -P 0x11 0 4k', volume_spec],
            text, [hdr, pay])
    amend = list(QAMEND)
    amend[3] = secret(file=keyfile)
    refuses(desc + ' (qemu-img amend)', amend + [volume_spec], text, [hdr, pay])


def mkbad(name, fields):
    """A copy of the pristine QEMU header with fields (luks1 names) changed."""
    f = name + '.hdr'
    shutil.copy('base.hdr', f)
    for k, v in fields.items():
        luks1.set_field(f, k, v)
    return f


# Control: the same write with the intact header reaches the payload, so
# an unchanged checksum below means that nothing was written.
shutil.copy('data.raw', 'ctl.raw')
psum = sha256('ctl.raw')
r = qemu_io('--object', secret(file='key1'), '-c', 'write -P 0x11 0 4k', spec('ctl.raw', 'base.hdr'))
check(r.ok, 'control: with a sound header the same qemu-io write succeeds', r)
check(sha256('ctl.raw') != psum, "control: and changes the payload's checksum")

bad('wrong passphrase', EXPECT['wrong-passphrase'], 'base.hdr', 'data.raw',
    spec('data.raw', 'base.hdr'), 'wrong')
bad('header file missing', EXPECT['missing'] % 'missing.hdr', 'missing.hdr', 'data.raw',
    spec('data.raw', 'missing.hdr'))
write('empty.hdr', b'')
bad('empty header file', EXPECT['truncated-empty'] % 'empty.hdr', 'empty.hdr', 'data.raw',
    spec('data.raw', 'empty.hdr'))
# The LUKS1 header proper is 592 bytes; its key-slot table starts at 208.
base = read('base.hdr')
write('short.hdr', base[:200])
bad('header truncated before the key-slot table (200 bytes)', EXPECT['truncated'] % 'short.hdr',
    'short.hdr', 'data.raw', spec('data.raw', 'short.hdr'))
# Cut inside the table, 2 bytes short of its end.  QEMU's block layer
# knows sizes in whole 512-byte sectors, so the missing bytes read as
# zeroes and the damage shows as a corrupted key slot.
write('slots.hdr', base[:590])
bad('header truncated inside the key-slot table (590 bytes)', EXPECT['slot7-stripes'],
    'slots.hdr', 'data.raw', spec('data.raw', 'slots.hdr'))
# Slot 0's key material: 4000 stripes x 64 bytes from byte 4096.
for name, size, desc in [('cut', 131072, 'inside key material (128 KiB)'),
                         ('unused', MiB, 'inside the key material of unused slots (1 MiB)')]:
    write(name + '.hdr', base[:size])
    bad('header truncated ' + desc,
        re.compile(EXPECT['truncated-material'].pattern % re.escape(name + '.hdr')),
        name + '.hdr', 'data.raw', spec('data.raw', name + '.hdr'))
for name, desc, text, fields in [
        ('magic', 'bad magic', EXPECT['not-luks'], {'magic': b'LUKS\xba\xbf'}),
        ('version', 'unknown version 3', EXPECT['luks3'], {'version': 3}),
        ('overlap', 'key slots 0 and 1 overlapping', EXPECT['overlap'],
         {'slot1.key-offset': luks1.get_field('base.hdr', 'slot0.key-offset')}),
        ('stripes', 'stripes zero', EXPECT['slot0-stripes'], {'slot0.stripes': 0}),
        ('iters', 'key slot iteration count zero', EXPECT['slot-iterations'],
         {'slot0.iterations': 0}),
        ('mkiters', 'master key iteration count zero', EXPECT['mk-iterations'],
         {'mk-iterations': 0})]:
    f = mkbad(name, fields)
    bad(desc, text, f, 'data.raw', spec('data.raw', f))
qemu_img('create', '-f', 'qcow2', 'image.qcow2', '1M')
bad('a qcow2 image given as header', EXPECT['not-luks'], 'image.qcow2', 'data.raw',
    spec('data.raw', 'image.qcow2'))
# The same file as header and payload: the payload would overwrite the
# header (offset 0), or is read in place of it.  The error must say so.
shutil.copy('base.hdr', 'both.img')
bad('the same detached header file as header and payload', EXPECT['same-image'] % 'both.img',
    'both.img', 'both.img', spec('both.img', 'both.img'))
shutil.copy('qatt.bak', 'both-att.img')
truncate('both-att.img', 4 * MiB)
bad('the same attached image as header and payload', EXPECT['same-image'] % 'both-att.img',
    'both-att.img', 'both-att.img', spec('both-att.img', 'both-att.img'))

# Read-only storage during amend.  We run as root, whom a file mode
# doesn't stop: QEMU's read-only option on the header node, then mode
# 0444 with the amend run as nobody.  The errors must be the luks
# driver's (or the block layer's), not a failure to open: the file name
# and "read-only" are in the json: spec that "Could not open" repeats.
shutil.copy('base.hdr', 'ro.hdr')
RO = {'driver': 'file', 'filename': 'ro.hdr', 'read-only': True}
refuses('amend with the header on a read-only node', QAMEND + [spec('data.raw', RO)],
        EXPECT['amend-read-only'] % 'ro.hdr', ['ro.hdr', 'data.raw'],
        absent=[EXPECT['open-failed']])
refuses('amend of the header alone on a read-only node', QAMEND + [spec(RO)],
        EXPECT['read-only'], ['ro.hdr'], absent=[EXPECT['open-failed']])
shutil.copy('data.raw', 'ctl.raw')
r = qemu_io('--object', secret(file='key1'), '-c', 'write -P 0x22 0 4k',
            '-c', 'read -P 0x22 0 4k', spec('ctl.raw', RO))
check(r.ok and 'Pattern verification failed' not in r.out,
      'I/O with the header on a read-only node works', r)
check(sha256('ro.hdr') == sha256('base.hdr'), 'and leaves the header untouched')
if os.getuid() == 0:
    os.mkdir('nobody')
    for f in ['data.raw', 'key1', 'key2']:
        shutil.copy(f, 'nobody')
    shutil.copy('base.hdr', 'nobody/ro.hdr')
    os.chmod('.', 0o755)
    os.chmod('nobody', 0o755)
    for f, m in [('ro.hdr', 0o444), ('key1', 0o444), ('key2', 0o444), ('data.raw', 0o666)]:
        os.chmod('nobody/' + f, m)
    os.chdir('nobody')
    refuses('amend as nobody, header file mode 0444',
            ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'] + QAMEND
            + [spec('data.raw', {'filename': 'ro.hdr', 'auto-read-only': True})],
            EXPECT['permission'] % 'ro.hdr', ['ro.hdr', 'data.raw'])
    os.chdir('..')
else:
    skip('amend as nobody, header file mode 0444', 'needs root')

# A header from a different volume: LUKS1 can't tell (nothing in the
# header identifies the payload), so it opens and yields garbage, but
# opening it read-write and reading must not write a byte.
truncate('scratch.raw', MiB)
cs('luksFormat', '--type', 'luks1', *FAST, '--key-file', 'key1', '--header', 'other.hdr',
   'scratch.raw')
before = sums(['other.hdr', 'data.raw'])
r = qemu_io('--object', secret(file='key1'), '-c', 'read 0 1M', spec('data.raw', 'other.hdr'))
check(r.ok, 'a header from a different volume with the same passphrase opens '
      '(undetectable in LUKS1)', r)
r = read_volume('key1', spec('data.raw', 'other.hdr'), 'out.raw')
check(r.ok and read('out.raw') is not None and len(read('out.raw')) == MiB
      and not same('out.raw', 'data.plain'),
      'a header from a different volume: the data read is wrong', r)
check(sums(['other.hdr', 'data.raw']) == before,
      'a header from a different volume: opening it wrote nothing')
reads_back('with its own header the same payload still reads right', 'key1',
           spec('data.raw', 'base.hdr'), 'data.plain')

# === LUKS2 ======================================================================
# Every LUKS2 header here is cryptsetup's (tests/luks2-create.py checks the
# ones QEMU creates).  The data path is checked with tests/lib/luks2.py, an
# independent LUKS2 parser and unlock (PBKDF2 from hashlib, Argon2 from
# python3-argon2) with dm-crypt's sector encryption: it encrypts what QEMU
# must read and decrypts what QEMU wrote, keyed with the volume key from its
# own unlock, which must equal cryptsetup's --dump-volume-key.  Fast KDF
# settings everywhere but in the two "defaults" rows, where cryptsetup's
# own choices (Argon2id with its benchmark, its sector size) are the point.
L2_PBKDF2 = ['--pbkdf', 'pbkdf2', *FAST]
L2_ARGON2 = ['--pbkdf-memory', '32', '--pbkdf-force-iterations', '4', '--pbkdf-parallel', '1']
PRIORITY = {0: 'ignore', 1: 'normal', 2: 'prefer'}


def l2_cipher_fields(encryption, key_bytes):
    """The LUKS fields of qemu-img info for a dm-crypt cipher spec such as
    aes-xts-plain64 or aes-cbc-essiv:sha256 and a volume key size."""
    alg, mode, iv = encryption.split('-', 2)
    iv, _, ivhash = iv.partition(':')
    d = {'cipher-alg': '%s-%d' % (alg, key_bytes * 8 // (2 if mode == 'xts' else 1)),
         'cipher-mode': mode, 'ivgen-alg': iv}
    if ivhash:
        d['ivgen-hash-alg'] = ivhash
    return d


def l2_info_want(hdr, detached):
    """What qemu-img info --output=json must say under format-specific data,
    computed from the independent parser's reading of the header (the
    layout of the fields is the iotests' luks2.out)."""
    seg, dig = hdr.segment(), hdr.digest()
    slots = sorted(hdr.json['keyslots'].items(), key=lambda kv: int(kv[0]))
    key_bytes = hdr.json['keyslots'][dig['keyslots'][0]]['key_size']
    d = l2_cipher_fields(seg['encryption'], key_bytes)
    d.update({'detached-header': detached, 'hash-alg': dig['hash'],
              'master-key-iters': dig['iterations'], 'payload-offset': int(seg['offset']),
              'uuid': hdr.uuid, 'slots': []})
    l2 = {'version': 2, 'header-size': hdr.hdr_size,
          'keyslots-size': int(hdr.json['config']['keyslots_size']),
          # an empty label or subsystem is left out
          **{k: v for k, v in (('label', hdr.label), ('subsystem', hdr.copy.subsystem)) if v},
          'segment': {'encryption': seg['encryption'], 'iv-tweak': int(seg['iv_tweak']),
                      'offset': int(seg['offset']), 'sector-size': seg['sector_size']},
          'keyslots': []}
    for sid, ks in slots:
        k, area = ks['kdf'], ks['area']
        slot = {'active': True, 'key-offset': int(area['offset']), 'stripes': ks['af']['stripes'],
                '__org.example_keyslot': int(sid)}
        one = {'id': int(sid), 'key-size': ks['key_size'], 'kdf': k['type'],
               'priority': PRIORITY[ks.get('priority', 1)], 'stripes': ks['af']['stripes'],
               'area-encryption': area['encryption'], 'area-key-size': area['key_size'],
               'area-offset': int(area['offset']), 'area-size': int(area['size'])}
        if k['type'] == 'pbkdf2':
            slot['iters'] = k['iterations']
            one.update(hash=k['hash'], iterations=k['iterations'])
        else:
            one.update(time=k['time'], memory=k['memory'], cpus=k['cpus'])
        d['slots'].append(slot)
        l2['keyslots'].append(one)
    d['__org.example_luks2'] = l2
    return d


def dict_diff(got, want, path=''):
    """The differences between two JSON values, one per line."""
    if isinstance(got, dict) and isinstance(want, dict):
        return [x for k in sorted(set(got) | set(want), key=str)
                for x in dict_diff(got.get(k, '(absent)'), want.get(k, '(absent)'),
                                   '%s/%s' % (path, k))]
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [x for i, (g, w) in enumerate(zip(got, want))
                for x in dict_diff(g, w, '%s[%d]' % (path, i))]
    return [] if got == want else ['%s: qemu-img %r, expected %r' % (path or '/', got, want)]


def l2_info(what, volume_spec, hdr, detached, size):
    """qemu-img info (no secret) against the independent parser: two TAP lines."""
    r = qemu_img('info', '--output=json', volume_spec)
    try:
        info = json.loads(r.out) if r.ok else {}
    except ValueError:
        info = {}
    data = info.get('format-specific', {}).get('data', {})
    want = l2_info_want(hdr, detached)
    got_l2, want_l2 = data.get('__org.example_luks2'), want.pop('__org.example_luks2')
    diff = dict_diff({k: v for k, v in data.items() if k != '__org.example_luks2'}, want)
    if info.get('virtual-size') != size:
        diff.insert(0, 'virtual-size: qemu-img %s, expected %d' % (info.get('virtual-size'), size))
    check(r.ok and not diff, '%s: qemu-img info: %d bytes, detached header %s, payload offset %d, '
          '%s %s %s, the UUID, digest and key slots as the independent parser reads them'
          % (what, size, str(detached).lower(), want['payload-offset'], want['cipher-alg'],
             want['cipher-mode'], want['ivgen-alg']), '\n'.join(diff) if r.ok else r)
    diff = dict_diff(got_l2, want_l2)
    check(r.ok and not diff, '%s: qemu-img info, __org.example_luks2: header and keyslots area '
          'sizes, label, segment (sector %d, iv_tweak %d), each keyslot and its KDF'
          % (what, want_l2['segment']['sector-size'], want_l2['segment']['iv-tweak']),
          '\n'.join(diff) if r.ok else r)


def l2_header(path):
    """The independent parser's reading of a header (None if it fails)."""
    try:
        return luks2.Header(path)
    except (luks2.LUKS2Error, ValueError, KeyError, OSError) as e:
        diag('luks2.py on %s: %s' % (path, e))
        return None


def l2_volume_key(what, hdr, header, keyfile, bits):
    """The volume key, from the independent unlock; checked against
    cryptsetup's.  Two TAP lines; None if the independent unlock failed."""
    try:
        slot, key = luks2.unlock(hdr, PASS[keyfile])
        why = 'keyslot %d' % slot
    except (luks2.LUKS2Error, ValueError, KeyError, AttributeError, OSError) as e:
        key, why = None, str(e)
    check(key is not None and len(key) * 8 == bits, '%s: the independent LUKS2 code unlocks '
          'the header (%s) to a %d-bit key passing its digest check' % (what, why, bits),
          '%s bits' % (len(key) * 8) if key else why)
    theirs = cs_volume_key(header, keyfile)
    check(key is not None and theirs == key, "%s: cryptsetup's --dump-volume-key "
          'gives the same key' % what,
          'independent: %s\ncryptsetup:  %s' % (key and key.hex(), theirs and theirs.hex()))
    return key


def l2_encrypt(hdr, key, src, dst, offset):
    """The independent encryption of the file src into dst at offset."""
    with open(dst, 'r+b') as f:
        f.seek(offset)
        f.write(luks2.payload_crypt(hdr, key, read(src), 0, True))


def l2_decrypts(hdr, key, src, offset, want):
    """Whether the independent decryption of src at offset gives the bytes
    want (no key: False)."""
    if key is None:
        return False
    with open(src, 'rb') as f:
        f.seek(offset)
        data = f.read(len(want))
    return len(data) == len(want) and luks2.payload_crypt(hdr, key, data, 0, False) == want


def head_sum(path, length):
    """sha256 of the first length bytes of path (a header region)."""
    with open(path, 'rb') as f:
        return sha256_data(f.read(length))


def set_json(path, edit):
    """Rewrite both metadata copies of path with edit(json) applied, valid
    checksums and the next sequence id (luks2.py set-json)."""
    hdr = luks2.Header(path)
    edit(hdr.json)
    luks2.set_json(path, hdr.json)


def cs_json(path):
    """The LUKS2 metadata as cryptsetup reads them (luksDump
    --dump-json-metadata), or {}."""
    r = cs('luksDump', '--dump-json-metadata', path)
    try:
        return json.loads(r.out) if r.ok else {}
    except ValueError:
        return {}


def cs_segment(path):
    """Segment 0 and keyslot 0 as luksDump prints them: offset, cipher,
    sector size, key bits, PBKDF."""
    out = cs('luksDump', path).out
    seg = re.search(r'^  0: crypt\n\toffset: (\d+) \[bytes\]\n.*?\n\tcipher: (\S+)\n'
                    r'\tsector: (\d+) \[bytes\]', out, re.M | re.S)
    ks = re.search(r'^  0: luks2\n\tKey:\s+(\d+) bits\n.*?\tPBKDF:\s+(\S+)', out, re.M | re.S)
    if not seg or not ks:
        return None
    return {'offset': int(seg.group(1)), 'cipher': seg.group(2), 'sector': int(seg.group(3)),
            'bits': int(ks.group(1)), 'kdf': ks.group(2)}


def cs_decrypt(h, p, detached, off, length):
    """cryptsetup's own decryption of a copy of the volume: `cryptsetup
    reencrypt --decrypt --force-offline-reencrypt` runs in user space on
    image files, no device-mapper needed.  It decrypts a detached volume in
    place, and moves an attached one's data to byte 0 (its header to
    another file).  It refuses a detached header whose data offset isn't 0:
    there the copy holds only the data area, and the header copy says
    offset 0 (set-json; the IVs don't depend on the offset).  Returns the
    Result and the first length bytes of plaintext (or None)."""
    hc, pc = 'csdec.hdr', 'csdec.raw'
    remove(hc)
    if detached:
        shutil.copy(h, hc)
        with open(p, 'rb') as f:
            f.seek(off)
            write(pc, f.read())
        if off:
            set_json(hc, lambda j: j['segments']['0'].update(offset='0'))
    else:
        shutil.copy(p, pc)
    r = cs('reencrypt', '--decrypt', '--force-offline-reencrypt', '--header', hc, pc,
           '--key-file', 'key1', timeout=120)
    return r, (read(pc)[:length] if r.ok else None)


def l2_row(tag, desc, detached, csopts, want, offset=None, tweak=None):
    """One LUKS2 volume made by cryptsetup, both data directions.  want:
    what the options ask for (kdf, hash, cipher, bits, sector; a missing
    key is cryptsetup's choice).  offset: --offset in bytes; tweak: an
    iv_tweak put into the metadata with luks2.py set-json."""
    what = 'LUKS2 %s, %s' % ('detached' if detached else 'attached', desc)
    if detached:
        h, p = tag + '.hdr', tag + '.raw'
        truncate(p, (offset or 0) + MiB)
        where = ['--header', h, p]
    else:
        h = p = tag + '.img'
        truncate(p, (offset or 16 * MiB) + MiB)
        where = [p]
    opts = csopts + (['--offset', str(offset // 512)] if offset else [])
    r = cs('luksFormat', '--type', 'luks2', *opts, '--key-file', 'key1', *where, timeout=120)
    if not check(r.ok, '%s: cryptsetup luksFormat --type luks2 %s%s' % (
            what, ' '.join(opts), ' --header' if detached else ''), r):
        return
    if tweak is not None:
        set_json(h, lambda j: j['segments']['0'].update(iv_tweak=str(tweak)))
        got = cs_json(h).get('segments', {}).get('0', {}).get('iv_tweak')
        check(got == str(tweak), '%s: with iv_tweak %d written by luks2.py set-json, cryptsetup '
              'reads iv_tweak %s (luksDump --dump-json-metadata)' % (what, tweak, got))
    hdr = l2_header(h)
    if not check(hdr, what + ': the independent parser reads the header'):
        return
    seg, ks = hdr.segment(), hdr.json['keyslots']['0']
    got = {'kdf': ks['kdf']['type'], 'hash': ks['kdf'].get('hash'), 'cipher': seg['encryption'],
           'bits': ks['key_size'] * 8, 'sector': seg['sector_size'], 'offset': int(seg['offset']),
           'iv_tweak': int(seg['iv_tweak'])}
    asked = dict(want, iv_tweak=tweak or 0)
    if offset or detached:
        asked['offset'] = offset or 0
    check(all(got[k] == v for k, v in asked.items()),
          '%s: the independent parser reads what was asked: %s' % (what, ', '.join(
              '%s %s' % (k, v) for k, v in asked.items())), 'read: %s' % got)
    theirs = cs_segment(h)
    mine = {k: got[k] for k in ('offset', 'cipher', 'sector', 'bits', 'kdf')}
    check(theirs == mine, '%s: cryptsetup luksDump agrees: data offset %d, %s, %d-byte sectors, '
          '%d-bit key, %s' % (what, got['offset'], got['cipher'], got['sector'], got['bits'],
                              got['kdf']), 'luksDump: %s\nluks2.py: %s' % (theirs, mine))
    off = got['offset']
    size = os.path.getsize(p) - off
    vspec = spec(p, h) if detached else spec(p)
    l2_info(what, spec(p, h, key=None) if detached else spec(p, key=None), hdr, detached, size)
    key = l2_volume_key(what, hdr, h, 'key1', got['bits'])
    hsum = sha256(h) if detached else head_sum(h, off)
    if key:
        l2_encrypt(hdr, key, 'plain1', p, off)
    reads_back(what + ': QEMU reads what the independent encryption wrote', 'key1', vspec,
               'plain1')
    r = qwrite('key1', 'plain2', vspec)
    check(r.ok and l2_decrypts(hdr, key, p, off, read('plain2')),
          what + ': the independent decryption reads what QEMU wrote (qemu-img convert)', r)
    # Unaligned: inside one sector (a read-modify-write with 4096-byte
    # sectors) and across a sector boundary
    want_data = bytearray(read('plain2'))
    want_data[1000:5000] = b'\x5a' * 4000
    r = qemu_io('--object', secret(file='key1'), '-c', 'write -P 0x5a 1000 4000', vspec)
    check(r.ok and l2_decrypts(hdr, key, p, off, bytes(want_data)),
          what + ': the independent decryption reads an unaligned write of QEMU '
          '(4000 bytes at 1000), the rest unchanged', r)
    check((sha256(h) if detached else head_sum(h, off)) == hsum,
          "%s: QEMU's I/O left the header byte-identical (%s)"
          % (what, h if detached else 'its first %d bytes' % off))
    check(testpass(h, p, 'key1').ok if detached else cs('open', '--test-passphrase', p,
                                                        '--key-file', 'key1').ok,
          what + ': cryptsetup open --test-passphrase still accepts the passphrase')
    # A third opinion: cryptsetup's own data path
    # (with an iv_tweak, which cryptsetup ignores for one segment, as
    # QEMU and luks2.py do)
    r, data = cs_decrypt(h, p, detached, off, MiB)
    check(r.ok and data == bytes(want_data), what + ": cryptsetup's own decryption "
          '(reencrypt --decrypt, on copies) reads what QEMU wrote', r)


XTS512 = {'cipher': 'aes-xts-plain64', 'bits': 512}
DEFAULTS = dict(XTS512, kdf='argon2id')
for row in [
        ('l2def-a', 'cryptsetup defaults (Argon2id, aes-xts-plain64, 512-bit key)', False, [],
         DEFAULTS),
        ('l2def-d', 'cryptsetup defaults (Argon2id, aes-xts-plain64, 512-bit key)', True, [],
         DEFAULTS),
        ('l2argon2i', 'Argon2i, aes-256-xts, 4096-byte sectors', True,
         ['--pbkdf', 'argon2i', *L2_ARGON2, '--cipher', 'aes-xts-plain64', '--key-size', '512',
          '--sector-size', '4096'], dict(XTS512, kdf='argon2i', sector=4096)),
        ('l2sha256', 'PBKDF2-sha256, aes-128-xts, 512-byte sectors', False,
         [*L2_PBKDF2, '--hash', 'sha256', '--cipher', 'aes-xts-plain64', '--key-size', '256',
          '--sector-size', '512'],
         dict(kdf='pbkdf2', hash='sha256', cipher='aes-xts-plain64', bits=256, sector=512)),
        ('l2sha512', 'PBKDF2-sha512, aes-cbc-essiv:sha256, 512-byte sectors', True,
         [*L2_PBKDF2, '--hash', 'sha512', '--cipher', 'aes-cbc-essiv:sha256', '--key-size', '256',
          '--sector-size', '512'],
         dict(kdf='pbkdf2', hash='sha512', cipher='aes-cbc-essiv:sha256', bits=256, sector=512)),
        ('l2essiv4k', 'Argon2id, aes-cbc-essiv:sha256, 4096-byte sectors', False,
         ['--pbkdf', 'argon2id', *L2_ARGON2, '--cipher', 'aes-cbc-essiv:sha256', '--key-size',
          '256', '--sector-size', '4096'],
         dict(kdf='argon2id', cipher='aes-cbc-essiv:sha256', bits=256, sector=4096)),
]:
    l2_row(*row)
# Data offsets (--offset) and iv_tweak; the other sector sizes.
# cryptsetup's luksFormat always writes iv_tweak 0 (an offset moves the
# data, not the IVs, and --skip is refused with luksFormat), so the
# non-zero ones are written into the metadata by luks2.py set-json,
# checksums recomputed; cryptsetup must still read them.
for tag, desc, detached, sector, offset, tweak in [
        ('l2off-d', '--offset 4096 (2 MiB), 4096-byte sectors', True, 4096, 2 * MiB, None),
        ('l2off-a', '--offset 40960 (20 MiB), 512-byte sectors', False, 512, 20 * MiB, None),
        ('l2tweak-d', '--offset 2048 (1 MiB), 512-byte sectors, iv_tweak 12345', True, 512, MiB,
         12345),
        ('l2tweak-a', '4096-byte sectors, iv_tweak 65536', False, 4096, None, 65536),
        ('l2tweak-odd', '4096-byte sectors, iv_tweak 4097 (not a whole 4096-byte sector)', True,
         4096, None, 4097),
        ('l2s1024', '1024-byte sectors', True, 1024, None, None),
        ('l2s2048', '2048-byte sectors', False, 2048, None, None)]:
    l2_row(tag, desc + ', PBKDF2, aes-256-xts', detached,
           [*L2_PBKDF2, '--cipher', 'aes-xts-plain64', '--key-size', '512',
            '--sector-size', str(sector)], dict(XTS512, kdf='pbkdf2', sector=sector),
           offset, tweak)


# cryptsetup's own encryption: `reencrypt --encrypt` (offline, in user
# space) turns a plaintext image into a LUKS2 volume in place, with a new
# detached header, or attached with the data moved up (--reduce-device-size).
for tag, desc, detached, opts in [
        ('csenc-xts', 'aes-xts-plain64 512-bit key, 4096-byte sectors, Argon2id', True,
         ['--pbkdf', 'argon2id', *L2_ARGON2, '--cipher', 'aes-xts-plain64', '--key-size', '512',
          '--sector-size', '4096']),
        ('csenc-essiv', 'aes-cbc-essiv:sha256, 512-byte sectors, PBKDF2', True,
         [*L2_PBKDF2, '--cipher', 'aes-cbc-essiv:sha256', '--key-size', '256',
          '--sector-size', '512']),
        ('csenc-att', 'aes-xts-plain64 256-bit key, --reduce-device-size 32M, PBKDF2', False,
         [*L2_PBKDF2, '--cipher', 'aes-xts-plain64', '--key-size', '256',
          '--reduce-device-size', '32M'])]:
    what = 'LUKS2 %s, encrypted by cryptsetup reencrypt --encrypt: %s' % (
        'detached' if detached else 'attached', desc)
    h, p = (tag + '.hdr', tag + '.raw') if detached else (tag + '.img',) * 2
    write(p, read('plain1') + (b'' if detached else bytes(32 * MiB)))
    r = cs('reencrypt', '--encrypt', '--type', 'luks2', '--force-offline-reencrypt', *opts,
           *(['--header', h] if detached else []), p, '--key-file', 'key1', timeout=120)
    if not check(r.ok, what + ': cryptsetup encrypts the plaintext in place', r):
        continue
    hdr = l2_header(h)
    off = int(hdr.segment()['offset']) if hdr else 0
    key = l2_volume_key(what, hdr, h, 'key1', hdr.json['keyslots']['0']['key_size'] * 8
                        if hdr else 0)
    vspec = spec(p, h) if detached else spec(p)
    r = read_volume('key1', vspec, 'out.raw')
    check(r.ok and read('out.raw')[:MiB] == read('plain1'),
          what + ': QEMU reads the plaintext (data at byte %d)' % off, r)
    check(l2_decrypts(hdr, key, p, off, read('plain1')),
          what + ': and so does the independent decryption')


# --- LUKS2: one damaged or outdated copy of the metadata -----------------------
# QEMU opens the volume from the other copy, warns naming the bad one, reads
# and writes the payload right, and never writes (repairs) the header.  The
# independent parser must choose the same copy.
def l2_make(tag, detached, extra=()):
    """A fast cryptsetup LUKS2 volume (PBKDF2, 4096-byte sectors, 1 MiB of
    data): (header file, payload file)."""
    if detached:
        h, p = tag + '.hdr', tag + '.raw'
        truncate(p, MiB)
        where = ['--header', h, p]
    else:
        h = p = tag + '.img'
        truncate(p, 17 * MiB)
        where = [p]
    r = cs('luksFormat', '--type', 'luks2', *L2_PBKDF2, '--sector-size', '4096', *extra,
           '--key-file', 'key1', *where)
    check(r.ok, 'LUKS2 %s: cryptsetup luksFormat%s' % (tag, ' --header' if detached else ''), r)
    return h, p


def l2_fill(h, p, plain):
    """The independent encryption of the file plain into the payload."""
    hdr = luks2.Header(h)
    key = luks2.unlock(hdr, PASS['key1'])[1]
    l2_encrypt(hdr, key, plain, p, int(hdr.segment()['offset']))


def flip(path, offset):
    with open(path, 'r+b') as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def chosen_copy(hdr):
    """Which copy the independent parser uses."""
    return 'primary' if hdr.copy.raw == hdr.data[:hdr.hdr_size] else 'secondary'


def l2_recovers(what, h, p, detached, warning, good, keyfile):
    """QEMU uses the good copy of header h (the independent parser too):
    five TAP lines."""
    hdr = l2_header(h)
    check(hdr and chosen_copy(hdr) == good, '%s: the independent parser uses the %s copy too'
          % (what, good), hdr and 'it uses the %s copy (%s)' % (chosen_copy(hdr), hdr.errors))
    try:
        key = luks2.unlock(hdr, PASS[keyfile])[1]
        off = int(hdr.segment()['offset'])
    except (luks2.LUKS2Error, AttributeError) as e:
        key, off = None, 0
        diag('luks2.py: %s' % e)
    vspec = spec(p, h) if detached else spec(p)
    before = sha256(h) if detached else head_sum(h, off)
    r = read_volume(keyfile, vspec, 'out.raw')
    check(r.ok and EXPECT['l2-copy'] % warning in r.out,
          '%s: QEMU opens it and warns "%s"' % (what, EXPECT['l2-copy'] % warning), r)
    check(r.ok and same('out.raw', 'plain1'), what + ': and reads the right data')
    r = qwrite(keyfile, 'plain2', vspec)
    check(r.ok and l2_decrypts(hdr, key, p, off, read('plain2')),
          what + ': QEMU writes, the independent decryption reads it', r)
    check((sha256(h) if detached else head_sum(h, off)) == before,
          what + ': the header is byte-identical: QEMU repaired nothing')


HDR_SIZE = 16384          # cryptsetup's default metadata copy size
JSON_BYTE = 4096 + 2      # a byte inside the JSON text of the primary copy
for tag, detached in [('rec', True), ('reca', False)]:
    l2_make(tag, detached)
    l2_fill(*((tag + '.hdr', tag + '.raw') if detached else (tag + '.img',) * 2), 'plain1')
for tag, base, desc, offset, warning, good in [
        ('rec-pjson', 'rec', 'primary copy changed, its checksum not', JSON_BYTE,
         ('primary', 'damaged (checksum mismatch)', 'secondary'), 'secondary'),
        ('rec-pmagic', 'reca', 'primary magic zeroed', None,
         ('primary', 'damaged (no LUKS2 magic)', 'secondary'), 'secondary'),
        ('rec-sjson', 'rec', 'secondary copy changed, its checksum not', HDR_SIZE + JSON_BYTE,
         ('secondary', 'damaged (checksum mismatch)', 'primary'), 'primary'),
        ('rec-sjson-a', 'reca', 'secondary copy changed, its checksum not',
         HDR_SIZE + JSON_BYTE, ('secondary', 'damaged (checksum mismatch)', 'primary'),
         'primary')]:
    detached = base == 'rec'
    h, p = (tag + '.hdr', tag + '.raw') if detached else (tag + '.img',) * 2
    for src, dst in ([('rec.hdr', h), ('rec.raw', p)] if detached else [('reca.img', h)]):
        shutil.copy(src, dst)
    if offset is None:
        with open(h, 'r+b') as f:
            f.write(bytes(6))
    else:
        flip(h, offset)
    l2_recovers('LUKS2 %s, %s' % ('detached' if detached else 'attached', desc), h, p,
                detached, warning, good, 'key1')

# An outdated copy: the header as it was before cryptsetup luksAddKey,
# one copy put back.  Only the newer copy has the added keyslot 1.
shutil.copy('rec.hdr', 'old.hdr')
r = cs('luksAddKey', *L2_PBKDF2, '--key-file', 'key1', 'rec.hdr', 'key2')
check(r.ok, 'LUKS2: cryptsetup luksAddKey (the newer header)', r)
old, new = read('old.hdr'), read('rec.hdr')
seq_old, seq_new = luks2.Header('old.hdr').copy.seqid, luks2.Header('rec.hdr').copy.seqid
check(seq_new > seq_old, 'LUKS2: the sequence id went from %d to %d' % (seq_old, seq_new))
for name, copy, good in [('rec-pold', 'primary', 'secondary'),
                         ('rec-sold', 'secondary', 'primary')]:
    a, b = (0, HDR_SIZE) if copy == 'primary' else (HDR_SIZE, 2 * HDR_SIZE)
    write(name + '.hdr', new[:a] + old[a:b] + new[b:])
    shutil.copy('rec.raw', name + '.raw')
    l2_recovers('LUKS2 detached, %s copy from before luksAddKey, opened with the added key'
                % copy, name + '.hdr', name + '.raw', True,
                (copy, 'outdated (sequence id %d against %d)' % (seq_old, seq_new), good),
                good, 'key2')

# --- LUKS2: refused, nothing written ----------------------------------------------
L2_PATTERN = [0x10]


def l2_refuses(desc, text, h, p, vspec=None, keyfile='key1'):
    """qemu-io opening the volume read-write to write fails saying text,
    header and payload byte-identical (three TAP lines).  Each write has
    a byte pattern of its own, so that one that got through would change
    the payload even after another had."""
    if vspec is None:
        vspec = spec(p, h) if h != p else spec(p)
    L2_PATTERN[0] += 1
    refuses('LUKS2 ' + desc, QIO + ['--object', secret(file=keyfile), '-c',
                                    'write -P 0x%x 0 4k' % L2_PATTERN[0], vspec],
            text, [h] if h == p else [h, p])


def edited(name, base, edit):
    """A copy of the header file base with edit(json) applied (set-json)."""
    shutil.copy(base, name)
    set_json(name, edit)
    return name


l2_make('rb', True)
shutil.copy('rb.raw', 'rbctl.raw')
psum = sha256('rbctl.raw')
r = qemu_io('--object', secret(file='key1'), '-c', 'write -P 0x11 0 4k',
            spec('rbctl.raw', 'rb.hdr'))
check(r.ok and sha256('rbctl.raw') != psum, 'LUKS2 control: with the sound header the same '
      "qemu-io write succeeds and changes the payload's checksum", r)

l2_refuses('wrong passphrase', EXPECT['wrong-passphrase'], 'rb.hdr', 'rb.raw', keyfile='wrong')
shutil.copy('rb.hdr', 'both.hdr')
flip('both.hdr', JSON_BYTE)
flip('both.hdr', HDR_SIZE + JSON_BYTE)
check(l2_header('both.hdr') is None, 'LUKS2 both copies damaged: the independent parser '
      'refuses the header too')
l2_refuses('both copies damaged', EXPECT['l2-both'], 'both.hdr', 'rb.raw')

# A reencryption started by cryptsetup and never run (--init-only), then
# what is left of it when its marks are taken out one by one.
l2_make('reenc', False)
r = cs('reencrypt', '--init-only', *L2_PBKDF2, '--key-file', 'key1', 'reenc.img')
check(r.ok and re.search(r'^Requirements:\s*online-reencrypt-v2\s*$',
                         cs('luksDump', 'reenc.img').out, re.M),
      'LUKS2: cryptsetup reencrypt --init-only; luksDump shows the requirement '
      'online-reencrypt-v2', r)
l2_refuses('reencryption initialized by cryptsetup',
           EXPECT['l2-requirement'] % 'online-reencrypt-v2' + EXPECT['l2-reencrypt'],
           'reenc.img', 'reenc.img')
j = luks2.Header('reenc.img').json
renc = [k for k, v in j['keyslots'].items() if v['type'] == 'reencrypt']
check(len(renc) == 1 and len(j['segments']) == 3, 'LUKS2: the reencryption left one reencrypt '
      'keyslot (%s) and 3 segments' % renc, json.dumps(j['keyslots']))
renc = renc[0] if renc else '2'
shutil.copy('reenc.img', 'reenc-k.img')
set_json('reenc-k.img', lambda j: j['config'].pop('requirements', None))
l2_refuses('reencryption, its requirement taken out (set-json)',
           EXPECT['l2-reencrypt-keyslot'] % int(renc), 'reenc-k.img', 'reenc-k.img')


def drop_reencrypt_keyslot(j):
    j['config'].pop('requirements', None)
    j['keyslots'].pop(renc, None)
    for d in [k for k, v in j['digests'].items() if v['keyslots'] == [renc]]:
        j['digests'].pop(d)


shutil.copy('reenc.img', 'reenc-s.img')
set_json('reenc-s.img', drop_reencrypt_keyslot)
l2_refuses('reencryption, its requirement and keyslot taken out (set-json)',
           EXPECT['l2-segments'] % 3, 'reenc-s.img', 'reenc-s.img')

# cryptsetup can't format with integrity here (it needs dm-integrity): the
# segment gets the integrity cryptsetup would record.
f = edited('integ.hdr', 'rb.hdr', lambda j: j['segments']['0'].update(integrity={
    'type': 'hmac(sha256)', 'journal_encryption': 'none', 'journal_integrity': 'none'}))
r = cs('luksDump', f)
check(r.ok and re.search(r'^\tintegrity: hmac\(sha256\)$', r.out, re.M),
      'LUKS2 integrity (set-json): cryptsetup luksDump shows integrity hmac(sha256)', r)
l2_refuses('segment with integrity (set-json)', EXPECT['l2-integrity'], f, 'rb.raw')
for name, desc, text, edit in [
        ('frob', 'an unknown mandatory requirement', EXPECT['l2-requirement'] % 'frobnicate',
         lambda j: j['config'].update(requirements={'mandatory': ['frobnicate']})),
        ('linear', 'a segment of type linear', EXPECT['l2-linear'],
         lambda j: j['segments']['0'].update(type='linear')),
        ('s8192', 'sector size 8192', EXPECT['l2-sector'] % 8192,
         lambda j: j['segments']['0'].update(sector_size=8192)),
        ('ignore', 'its only keyslot of priority ignore, the right passphrase',
         EXPECT['l2-no-keyslot'], lambda j: j['keyslots']['0'].update(priority=0)),
        # A 512-bit key takes two blocks of PBKDF2-SHA256: twice the iterations
        ('iters', 'PBKDF2-sha256 iterations 4294967295 for a 512-bit key, over the KDF work '
         'limit', EXPECT['l2-kdf-limit'] % ('keyslot 0', '4294967295 PBKDF2 iterations',
                                            2 * 4294967295, 268435456),
         lambda j: j['keyslots']['0']['kdf'].update(iterations=4294967295))]:
    f = edited(name + '.hdr', 'rb.hdr', edit)
    l2_refuses('%s (set-json)' % desc, text, f, 'rb.raw')

# Argon2: the KDF work limit of the series, and the bounds of LUKS2.
l2_make('rarg', True, ['--pbkdf', 'argon2id', *L2_ARGON2])
# A pass of Argon2 over a KiB counts as 10 units of KDF work, each KiB 8 more.
argon2_limit = 'keyslot 0, Argon2id 4 passes over 32 KiB (1536 units), under a KDF work ' \
               'limit of %d'
l2_refuses(argon2_limit % 1000,
           EXPECT['l2-kdf-limit'] % ('keyslot 0', 'Argon2 costs of 4 passes over 32 KiB', 1536,
                                     1000), 'rarg.hdr', 'rarg.raw',
           spec('rarg.raw', 'rarg.hdr', **{'__org.example_kdf-work-limit': 1000}))
# The keyslot's 1536 units and the digest's 1000 PBKDF2 iterations: just enough.
r = qemu_io('--object', secret(file='key1'), '-c', 'read 0 4k',
            spec('rarg.raw', 'rarg.hdr', **{'__org.example_kdf-work-limit': 2536}))
check(r.ok, 'LUKS2 ' + (argon2_limit % 2536).replace(', under', ' and the digest 1000, with') +
      ': opens', r)
for name, desc, text, edit, limit in [
        ('amemlim', 'Argon2 memory 1048577 KiB, over the memory limit of 1 GiB',
         EXPECT['l2-argon2-memory-limit'] % (1048577, 1048576),
         lambda j: j['keyslots']['0']['kdf'].update(memory=1048577), None),
        ('amem', 'Argon2 memory 4194305 KiB, the memory limit raised',
         EXPECT['l2-argon2-memory'],
         lambda j: j['keyslots']['0']['kdf'].update(memory=4194305), 8388608),
        ('alanes', 'Argon2 parallelism 5', EXPECT['l2-argon2-lanes'],
         lambda j: j['keyslots']['0']['kdf'].update(cpus=5), None)]:
    f = edited(name + '.hdr', 'rarg.hdr', edit)
    extra = {'__org.example_kdf-memory-limit': limit} if limit else {}
    l2_refuses('%s (set-json)' % desc, text, f, 'rarg.raw',
               spec('rarg.raw', f, **extra) if extra else None)

# QEMU adds keys to cryptsetup's LUKS2 headers, and cryptsetup takes them
# (PBKDF2, so that cryptsetup's check is quick); the payload is untouched.
l2_make('ramend', False)
shutil.copy('rb.hdr', 'rbam.hdr')
shutil.copy('rb.raw', 'rbam.raw')
for desc, h, p, vspec in [('attached', 'ramend.img', 'ramend.img', spec('ramend.img')),
                          ('detached', 'rbam.hdr', 'rbam.raw', spec('rbam.raw', 'rbam.hdr')),
                          ('detached header alone', 'rbam.hdr', 'rbam.raw', spec('rbam.hdr'))]:
    def payload_sum():
        return sha256_data(read(p)[16 * MiB:] if h == p else read(p))
    psum = payload_sum()
    r = run(QAMEND[:-1] + ['state=active,new-secret=sec1,kdf=pbkdf2,kdf-iterations=1000',
                           vspec])
    check(r.ok, 'LUKS2 %s: qemu-img amend adds a key to a cryptsetup header' % desc, r)
    ok = (cs('open', '--test-passphrase', p, '--key-file', 'key2') if h == p
          else testpass(h, p, 'key2')).ok
    check(ok, 'LUKS2 %s: cryptsetup --test-passphrase accepts the key QEMU added' % desc)
    check(payload_sum() == psum,
          'LUKS2 %s: the amend left the payload byte-identical' % desc)
    r = run(QAMEND[:-1] + ['state=inactive,old-secret=sec1', vspec])
    check(r.ok and not (cs('open', '--test-passphrase', p, '--key-file', 'key2') if h == p
                        else testpass(h, p, 'key2')).ok,
          'LUKS2 %s: qemu-img amend erases it again, and cryptsetup refuses it then' % desc, r)

tap.done()
