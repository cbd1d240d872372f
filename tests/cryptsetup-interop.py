#!/usr/bin/python3
"""LUKS1 detached headers between QEMU (the build under test) and
cryptsetup, both ways; recovery from header backups; LUKS2 refused; bad
input refused without writing a byte.  tests/INTEROP.md has the table.

cryptsetup can't map devices here (no device-mapper), so the data path is
checked with tests/lib/luks1.py, which unlocks headers and encrypts and
decrypts payloads on its own (AES from python3-cryptography).  Every
volume key is taken twice: from that independent unlock, and from
`cryptsetup luksDump --dump-volume-key`; the two must agree.  Prints TAP.
"""

import os
import re
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lib'))
import luks1  # noqa: E402
from harness import (MiB, QEMU_IMG, QEMU_IO, check, missing_tools, qemu_img,  # noqa: E402
                     qemu_io, read, read_volume, reads_back, refuses, remove, run,
                     scratch, secret, sha256, skip, spec, sums, tap, write)

# What QEMU says.  The series may reword these: change them here.
EXPECT = {
    'wrong-passphrase': 'Invalid password, cannot unlock any keyslot',
    'not-luks': 'Volume is not in LUKS format',
    'luks2': 'LUKS version 2 is not supported',
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
}
CS = ['cryptsetup', '--batch-mode']
FAST = ['--pbkdf-force-iterations', '1000']       # the least PBKDF2 work
QIO = [QEMU_IO]

gone = missing_tools([QEMU_IMG, QEMU_IO], ['cryptsetup', 'setpriv'], ['cryptography'])
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
r = qemu_img('amend', '--object', secret(file='key2'), '--object', secret('old', file='key1'),
             '-o', 'state=inactive,old-secret=old', spec('q1.hdr'))
check(r.ok, 'amend: qemu-img amend on the header alone erases the first key', r)
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
bad('empty header file', EXPECT['truncated'] % 'empty.hdr', 'empty.hdr', 'data.raw',
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

# LUKS2, cryptsetup's default format: refused by name.
truncate('l2.raw', MiB)
r = cs('luksFormat', '--type', 'luks2', '--pbkdf', 'pbkdf2', *FAST, '--key-file', 'key1',
       '--header', 'l2.hdr', 'l2.raw')
check(r.ok, 'LUKS2: cryptsetup luksFormat --type luks2 --header', r)
bad('LUKS2 detached header', EXPECT['luks2'], 'l2.hdr', 'l2.raw', spec('l2.raw', 'l2.hdr'))
truncate('l2.img', 20 * MiB)
cs('luksFormat', '--pbkdf', 'pbkdf2', *FAST, '--key-file', 'key1', 'l2.img')
r = cs('luksDump', 'l2.img')
check(re.search(r'^Version:\s*2$', r.out, re.M),
      'LUKS2: cryptsetup luksFormat with its defaults makes LUKS2', r)
bad('LUKS2 attached image', EXPECT['luks2'], 'l2.img', 'l2.raw', spec('l2.img'))

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

tap.done()
