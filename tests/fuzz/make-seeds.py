#!/usr/bin/python3
"""Make the seed corpus of the LUKS header fuzz target, tests/fuzz/seeds/,
and the reproducers of past findings, tests/fuzz/regressions/.

Not part of the test command: the seeds are checked in, and making them
anew changes every salt and key.  Run it after a change to the target's
input format or to what the seeds should cover:

    tests/fuzz/make-seeds.py [NAME...]     # needs build/obj/qemu-img

With names, only those seeds are written (all are made and checked).

Each seed is a volume made by qemu-img or cryptsetup with the target's
passphrase and KDF costs below the target's bounds, cut after its key
material (the payload is never read), preceded by the target's flag byte,
and stored xz-compressed as NAME.xz.  Seeds whose names start with
"refused-" are headers that QEMU must refuse (tests/fuzz.py checks that
they are refused, the others that they open and unlock).  Key material of inactive LUKS1 key
slots is zeroed (cryptsetup fills it with random bytes; nothing reads it
but the check that it is there), so that the seeds compress to the size
of their active key material; so is the part of a LUKS2 keyslots area
that no keyslot of type luks2 uses.  Every seed is checked to unlock with
cryptsetup before it is written.

The regressions are made the same way, and most then get their JSON
metadata edited (both copies, with valid checksums) into the header of a
finding; "refused-unlock-" in a name means opened in the target's no-io
mode and refused in its unlock mode.  The seeds and regressions don't
depend on one another: "tests/fuzz/make-seeds.py $(cd
tests/fuzz/regressions; ls | sed 's/\\.xz$//')" writes only the latter.
"""

import json
import lzma
import os
import struct
import subprocess
import sys
import tempfile

# Run by hand (not by scripts/test, which sets PYTHONPATH): tests/lib and
# the iotests of the work tree (luks2_format) on sys.path here.
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(TOP, 'tests', 'lib'))
sys.path.insert(0, os.path.join(TOP, 'build', 'qemu', 'tests', 'qemu-iotests'))
import luks2_format as luks2fmt  # noqa: E402
from proc import QEMU_IMG  # noqa: E402
from specs import secret  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, 'seeds')
REGRESSIONS = os.path.join(HERE, 'regressions')

# Must match tests/fuzz/fuzz-crypto-luks.c of the series
PASSPHRASE = b'luks-fuzz-passphrase'
DETACHED, LUKS2 = 0x01, 0x02

# Small costs: PBKDF2 at cryptsetup's minimum, Argon2 at 4 passes over
# 32 KiB, one lane (the target bounds the KDF work to 8192 units and the
# Argon2 memory to 256 KiB)
PBKDF2 = ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000']
ARGON2 = ['--pbkdf-memory', '32', '--pbkdf-parallel', '1', '--pbkdf-force-iterations', '4']


def sh(*args, stdin=PASSPHRASE):
    subprocess.run([str(a) for a in args], input=stdin, check=True,
                   stdout=subprocess.DEVNULL)


def cryptsetup(*args, stdin=PASSPHRASE):
    sh('cryptsetup', '-q', '--key-file=-', *args, stdin=stdin)


def luks1_key_material_end(data, zero_inactive=True):
    """The end of the key material of the LUKS1 header in data (a
    bytearray), zeroing that of inactive slots"""
    key_bytes = struct.unpack_from('>I', data, 108)[0]
    end = 0
    for i in range(8):
        active, _, _, offset, stripes = struct.unpack_from('>II32sII', data, 208 + 48 * i)
        length = (key_bytes * stripes + 511) // 512 * 512
        if active != 0x00AC71F3 and zero_inactive:
            data[offset * 512:offset * 512 + length] = bytes(length)
        end = max(end, offset * 512 + length)
    return end


def luks2_keyslots_end(data):
    """The end of the keyslots area of the LUKS2 header in data (a
    bytearray), zeroing what no keyslot uses of it"""
    primary = luks2fmt.read_copies(data)[0]
    meta = json.loads(primary.text)
    end = luks2fmt.keyslots_end(meta, primary.hdr_size)
    used = bytearray(end)
    for ks in meta['keyslots'].values():
        if ks['type'] == 'luks2':
            offset, size = int(ks['area']['offset']), int(ks['area']['size'])
            used[offset:offset + size] = b'\1' * size
    for i in range(2 * primary.hdr_size, end):
        if not used[i]:
            data[i] = 0
    return end


def save(name, flags, path, luks1, header=None, damage=None, where=SEEDS):
    """Check that path unlocks, cut it, apply damage() to its bytes, and
    write it as a seed (in where)"""
    cryptsetup('luksOpen', '--test-passphrase', path, *(['--header', header] if header else []))
    with open(header or path, 'rb') as f:
        data = bytearray(f.read())
    end = luks1_key_material_end(data) if luks1 else luks2_keyslots_end(data)
    if damage:
        damage(data)
    if sys.argv[1:] and name not in sys.argv[1:]:
        return
    assert len(data) >= end, name
    seed = bytes([flags]) + bytes(data[:end])
    out = os.path.join(where, name + '.xz')
    with open(out, 'wb') as f:
        f.write(lzma.compress(seed, preset=9 | lzma.PRESET_EXTREME))
    print('%-40s %8d bytes, %7d compressed' % (name, len(seed), os.path.getsize(out)))


def volume(path, size='4M'):
    sh('truncate', '-s', size, path, stdin=None)
    return path


def rekey(path, tmp):
    """Replace the keyslot of a LUKS1 header by one of 1000 PBKDF2
    iterations: qemu-img's shortest iter-time, 1 ms, still asks for
    thousands, as many as the machine computes in that time.  cryptsetup
    puts the new keyslot in slot 1 and disables slot 0; the rest of the
    header stays as QEMU made it."""
    newkey = os.path.join(tmp, 'newkey')
    with open(newkey, 'wb') as f:
        f.write(PASSPHRASE)
    cryptsetup('luksChangeKey', *PBKDF2, path, newkey)


def qemu_luks1(tmp):
    """LUKS1 headers made by qemu-img, attached and detached"""
    obj = '--object', secret(data=PASSPHRASE.decode())
    att = os.path.join(tmp, 'qemu-att.img')
    sh(QEMU_IMG, 'create', *obj, '-f', 'luks', '-o',
       'key-secret=sec0,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,'
       'ivgen-hash-alg=sha256,hash-alg=sha256,iter-time=1', att, '1M', stdin=None)
    rekey(att, tmp)
    save('qemu-luks1-cbc-essiv-attached', LUKS2, att, True)
    det = os.path.join(tmp, 'qemu-det.img')
    sh(QEMU_IMG, 'create', *obj, '-f', 'luks', '-o',
       'key-secret=sec0,cipher-alg=aes-128,cipher-mode=xts,hash-alg=sha1,'
       'iter-time=1,detached-header=true', det, stdin=None)
    rekey(det, tmp)
    save('qemu-luks1-xts-detached', LUKS2 | DETACHED, det, True, header=det)


def cryptsetup_luks1(tmp):
    v = volume(os.path.join(tmp, 'cs1a.img'))
    cryptsetup('luksFormat', '--type', 'luks1', '--cipher', 'aes-cbc-essiv:sha256',
               '--key-size', '128', '--hash', 'sha256', '--pbkdf-force-iterations', '1000', v)
    save('cryptsetup-luks1-cbc-essiv-sha256', LUKS2, v, True)
    v = volume(os.path.join(tmp, 'cs1b.img'))
    cryptsetup('luksFormat', '--type', 'luks1', '--cipher', 'aes-xts-plain64',
               '--key-size', '256', '--hash', 'sha1', '--pbkdf-force-iterations', '1000', v)
    save('cryptsetup-luks1-xts-plain64-sha1', LUKS2, v, True)


def luks2_format(path, *args, stdin=PASSPHRASE):
    cryptsetup('luksFormat', '--type', 'luks2', '--luks2-metadata-size', '16k', *args, path,
               stdin=stdin)


def cryptsetup_luks2(tmp):
    # PBKDF2, 512-byte sectors, the default cipher with a 256-bit key
    v = volume(os.path.join(tmp, 'cs2a.img'))
    luks2_format(v, '--cipher', 'aes-xts-plain64', '--key-size', '256', '--hash', 'sha256',
                 '--sector-size', '512', '--luks2-keyslots-size', '128k', *PBKDF2)
    save('cryptsetup-luks2-pbkdf2-xts-512', LUKS2, v, False)

    # The same with its primary binary header wiped: found by its
    # secondary copy, and opened from it.  (Damaged only in the seed:
    # cryptsetup would repair it when it opens the volume.)
    def wipe_primary(data):
        data[:4096] = bytes(4096)
    save('cryptsetup-luks2-damaged-primary', LUKS2, v, False, damage=wipe_primary)

    # Argon2id, 4096-byte sectors, metadata of 32 KiB
    v = volume(os.path.join(tmp, 'cs2b.img'))
    cryptsetup('luksFormat', '--type', 'luks2', '--luks2-metadata-size', '32k',
               '--cipher', 'aes-cbc-essiv:sha256', '--key-size', '128', '--sector-size', '4096',
               '--luks2-keyslots-size', '64k', '--pbkdf', 'argon2id', *ARGON2, v)
    save('cryptsetup-luks2-argon2id-cbc-essiv-4096', LUKS2, v, False)

    # Argon2i, a detached header, 512-byte sectors
    v = volume(os.path.join(tmp, 'cs2c.img'))
    h = os.path.join(tmp, 'cs2c.hdr')
    luks2_format(v, '--header', h, '--cipher', 'aes-cbc-plain64', '--key-size', '128',
                 '--sector-size', '512', '--luks2-keyslots-size', '64k',
                 '--pbkdf', 'argon2i', *ARGON2)
    save('cryptsetup-luks2-argon2i-detached', LUKS2 | DETACHED, v, False, header=h)

    # Two keyslots, the second preferred and the only one the target's
    # passphrase opens; a token, a label and a subsystem
    v = volume(os.path.join(tmp, 'cs2d.img'))
    other = b'another-passphrase'
    luks2_format(v, '--cipher', 'aes-cbc-essiv:sha256', '--key-size', '128',
                 '--sector-size', '4096', '--luks2-keyslots-size', '128k',
                 '--label', 'fuzz', '--subsystem', 'qemu',
                 *PBKDF2, stdin=other)
    with tempfile.NamedTemporaryFile() as newkey:
        newkey.write(PASSPHRASE)
        newkey.flush()
        cryptsetup('luksAddKey', *PBKDF2, v, newkey.name, stdin=other)
    sh('cryptsetup', 'config', '--priority', 'prefer', '--key-slot', '1', v, stdin=None)
    with tempfile.NamedTemporaryFile() as token:
        token.write(b'{"type":"qemu-fuzz","keyslots":["1"],"note":"a token QEMU ignores"}')
        token.flush()
        sh('cryptsetup', 'token', 'import', '--json-file', token.name, v, stdin=None)
    save('cryptsetup-luks2-two-keyslots-token', LUKS2, v, False)

    # A reencryption initialised and never run: the mandatory requirement
    # online-reencrypt-v2, a keyslot of type reencrypt, three segments.
    # QEMU refuses it, saying why; the name says so to tests/fuzz.py.
    v = volume(os.path.join(tmp, 'cs2e.img'))
    luks2_format(v, '--cipher', 'aes-cbc-essiv:sha256', '--key-size', '128',
                 '--sector-size', '4096', '--luks2-keyslots-size', '256k', *PBKDF2)
    cryptsetup('reencrypt', '--init-only', '--resilience', 'none', *PBKDF2, v)
    save('refused-cryptsetup-luks2-reencryption', LUKS2, v, False)


def edit_json(edit):
    """A damage() that rewrites the JSON text of both copies of a LUKS2
    header with edit(text), as bytes that need not be JSON, and gives
    both copies a valid checksum again"""
    def damage(data):
        primary = luks2fmt.read_copies(data)[0]
        hdr_size = primary.hdr_size
        text = edit(primary.text)
        assert len(text) < hdr_size - luks2fmt.BIN_SIZE
        for offset in (0, hdr_size):
            raw = bytearray(data[offset:offset + luks2fmt.BIN_SIZE])
            raw += text + bytes(hdr_size - luks2fmt.BIN_SIZE - len(text))
            luks2fmt.seal(raw)
            data[offset:offset + hdr_size] = raw
    return damage


def add_token(token):
    """edit_json(): a token with the JSON text token (bytes)"""
    return edit_json(lambda text: text.replace(b'"tokens":{}', b'"tokens":{"0":%s}' % token))


def edit_metadata(edit):
    """edit_json(): edit(metadata) changes the parsed metadata in place"""
    def change(text):
        meta = json.loads(text)
        edit(meta)
        return json.dumps(meta, separators=(',', ':')).encode()
    return edit_json(change)


def regressions(tmp):
    """The reproducers of past findings, in tests/fuzz/regressions/: the
    checks apply as to seeds (those named refused-* must be refused, in
    both modes; refused-unlock-* open in no-io mode and must not unlock)"""
    v = volume(os.path.join(tmp, 'reg.img'))
    luks2_format(v, '--cipher', 'aes-cbc-essiv:sha256', '--key-size', '128', '--hash', 'sha256',
                 '--sector-size', '512', '--luks2-keyslots-size', '64k', *PBKDF2)

    def no_key_material(data):
        """What refuses a header is in its metadata: its key material,
        which doesn't compress, can go"""
        hdr_size = luks2fmt.BinHeader(data).hdr_size
        data[2 * hdr_size:] = bytes(len(data) - 2 * hdr_size)

    def reg(name, damage):
        def both(data):
            damage(data)
            if name.startswith('refused-'):
                no_key_material(data)
        save(name, LUKS2, v, False, damage=both, where=REGRESSIONS)

    # LUKS2 metadata are RFC 8259 JSON: QEMU's single-quoted strings are
    # refused (they once hid a JSON bomb from the bound of the metadata)
    reg('refused-json-single-quotes',
        add_token(b"""{'type':'qemu-fuzz','keyslots':[],'x"':[[[1]]]}"""))
    # Nesting: json-c, and so cryptsetup, reads values 32 levels deep and
    # no deeper, the scalar in the innermost container being a level: 31
    # containers (the root object, tokens, the token, 28 arrays) open,
    # 32 don't
    reg('json-nesting-31-containers',
        add_token(b'{"type":"qemu-fuzz","keyslots":[],"n":%s1%s}' % (b'[' * 28, b']' * 28)))
    reg('refused-json-nesting-32-containers',
        add_token(b'{"type":"qemu-fuzz","keyslots":[],"n":%s1%s}' % (b'[' * 29, b']' * 29)))
    # cryptsetup opens headers with bytes that aren't UTF-8 in strings and
    # with duplicate keys (the last one counts)
    reg('latin1-token', add_token(b'{"type":"qemu-fuzz","keyslots":[],"note":"caf\xe9"}'))
    reg('duplicate-key-token', add_token(b'{"type":"qemu-fuzz","keyslots":[],'
                                         b'"type":"qemu-fuzz-2"}'))

    # A keyslot bound to no digest, or to two
    def unbind(meta):
        meta['digests']['0']['keyslots'] = []
    reg('refused-keyslot-no-digest', edit_metadata(unbind))

    def bind_twice(meta):
        meta['digests']['1'] = dict(meta['digests']['0'])
    reg('refused-keyslot-two-digests', edit_metadata(bind_twice))

    # PBKDF2 work is weighed by the hash: 2000 iterations of RIPEMD-160
    # are within the target's bound of 8192 units counted as SHA-256's,
    # and five times over it as they really cost.  (With its key
    # material: counted as SHA-256's, it unlocks.)
    v = volume(os.path.join(tmp, 'reg-ripemd160.img'))
    luks2_format(v, '--cipher', 'aes-cbc-essiv:sha256', '--key-size', '128', '--hash',
                 'ripemd160', '--sector-size', '512', '--luks2-keyslots-size', '64k',
                 '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '2000')
    save('refused-unlock-pbkdf2-ripemd160', LUKS2, v, False, where=REGRESSIONS)


def main():
    os.makedirs(SEEDS, exist_ok=True)
    os.makedirs(REGRESSIONS, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        qemu_luks1(tmp)
        cryptsetup_luks1(tmp)
        cryptsetup_luks2(tmp)
        regressions(tmp)


if __name__ == '__main__':
    main()
