#!/usr/bin/python3
"""LUKS2 headers that QEMU creates and amends, checked by an oracle that
shares no code with QEMU or cryptsetup: tests/lib/luks2.py.

For each volume QEMU creates (attached and detached; PBKDF2, Argon2i and
Argon2id; 512 and 4096-byte sectors; AES-XTS and AES-CBC-ESSIV), both
copies of the header must parse on their own with a valid checksum, the
same sequence id and the same metadata; the oracle must unlock the
volume key with the passphrase and no other; what QEMU writes through
the volume must decrypt, by the oracle, to the plaintext, and what the
oracle encrypts must read back through QEMU.  cryptsetup, where it is
installed, must dump the same volume key.

Then QEMU adds and erases keyslots: after each amend both copies parse
with valid checksums, their sequence id went up by one, the oracle
unlocks the same volume key with the new passphrases and not with the
erased ones, and the payload still decrypts.  After an I/O error in
each write of an amend (blkdebug), the copy the oracle picks opens with
either the old or the new passphrases, as QEMU says.  Metadata that QEMU
doesn't interpret, written by the oracle, come out of an amend as they
went in.  Last, what QEMU must refuse, leaving the files byte-identical.
Prints TAP.
"""

import json
import os
import shutil
import struct
import subprocess

import luks2
from proc import (QEMU_IMG, QEMU_IO, MiB, missing_tools, qemu_img, qemu_io, read, run, scratch,
                  write)
from specs import read_volume, refuses, secret, spec
from tap import check, diag, skip, tap

KiB = 1024
SIZE = 1 * MiB
PASS = {'key1': b'first passphrase', 'key2': b'second passphrase',
        'key3': b'third passphrase', 'wrong': b'not the passphrase'}
SECRET_ID = {'key1': 'sec0', 'key2': 'sec1', 'key3': 'sec2', 'wrong': 'sec9'}
FAST = {
    'pbkdf2': 'kdf=pbkdf2,kdf-iterations=1000',
    'argon2i': 'kdf=argon2i,kdf-memory=32,kdf-parallel=1,kdf-iterations=4',
    'argon2id': 'kdf=argon2id,kdf-memory=64,kdf-parallel=2,kdf-iterations=4',
}
CIPHERS = {
    'aes-xts-plain64': 'cipher-alg=aes-256,cipher-mode=xts',
    'aes-cbc-essiv:sha256': 'cipher-alg=aes-128,cipher-mode=cbc,'
                            'ivgen-alg=essiv,ivgen-hash-alg=sha256',
}

gone = missing_tools([QEMU_IMG, QEMU_IO], modules=['cryptography'])
if gone:
    check(False, 'prerequisites present: missing ' + ', '.join(gone))
    tap.done()
HAVE_ARGON2 = luks2.have_argon2()
CRYPTSETUP = shutil.which('cryptsetup', path=os.environ.get('PATH', '') +
                          ':/usr/sbin:/sbin')
scratch('luks2-create.')
for name, data in PASS.items():
    write(name, data)


def objects():
    args = []
    for name in PASS:
        args += ['--object', secret(SECRET_ID[name], file=name)]
    return args


def header_file(vol):
    """The file that holds the header of @vol: (payload, header or None)"""
    return vol['header'] or vol['payload']


def vol_spec(vol, key='key1', payload=None):
    return spec(payload or vol['payload'], vol['header'], SECRET_ID[key])


def copies(path):
    """Both copies of the header, each parsed on its own by the oracle:
    a list of (luks2.Copy or None, why not)"""
    data = read(path)[:2 * 4 * MiB]
    out = []
    try:
        out.append((luks2.Copy(data, 0, False), None))
    except (luks2.LUKS2Error, ValueError) as e:
        out.append((None, str(e)))
    size = struct.unpack_from('>Q', data, 8)[0]
    try:
        out.append((luks2.Copy(data[size:], size, True), None))
    except (luks2.LUKS2Error, ValueError) as e:
        out.append((None, str(e)))
    return out


def check_copies(desc, path, seqid=None):
    """Both copies valid, alike, with sequence id @seqid if given;
    returns their sequence id"""
    (p, why_p), (s, why_s) = copies(path)
    ok = p is not None and s is not None
    check(ok, f'{desc}: both header copies parse, checksums valid',
          f'primary: {why_p}; secondary: {why_s}')
    if not ok:
        return None
    check(p.seqid == s.seqid and p.json == s.json and p.uuid == s.uuid,
          f'{desc}: both copies hold the same metadata and sequence id '
          f'({p.seqid})', f'primary {p.seqid}, secondary {s.seqid}')
    if seqid is not None:
        check(p.seqid == seqid, f'{desc}: sequence id is {seqid}',
              f'it is {p.seqid}')
    return p.seqid


def oracle_unlock(path, key):
    try:
        return luks2.unlock(luks2.Header(path), PASS[key])
    except luks2.LUKS2Error:
        return None


def needs_argon2(meta, key=None):
    kss = meta['keyslots'].values()
    return any(ks.get('kdf', {}).get('type', '').startswith('argon2')
               for ks in kss)


def segment_bytes(vol, length, offset=0):
    hdr = luks2.Header(header_file(vol))
    seg = hdr.segment()
    with open(vol['payload'], 'rb') as f:
        f.seek(int(seg['offset']) + offset)
        return hdr, f.read(length)


def check_volume(desc, vol, volume_key=None):
    """The oracle and QEMU agree on the data of @vol"""
    path = header_file(vol)
    hdr = luks2.Header(path)
    if needs_argon2(hdr.json) and not HAVE_ARGON2:
        skip(f'{desc}: the oracle unlocks the volume key',
             'python3-argon2 is missing')
        return None
    got = oracle_unlock(path, 'key1')
    check(got is not None, f'{desc}: the oracle unlocks the volume key '
          f'with the passphrase')
    if got is None:
        return None
    key = got[1]
    if volume_key is not None:
        check(key == volume_key, f'{desc}: the volume key is unchanged')
    check(oracle_unlock(path, 'wrong') is None,
          f'{desc}: the oracle refuses a wrong passphrase')

    # QEMU writes, the oracle decrypts
    plain = os.urandom(SIZE)
    write('plain.raw', plain)
    r = qemu_img('convert', '-n', '-O', 'luks', *objects(), 'plain.raw',
                 vol_spec(vol))
    check(r.ok, f'{desc}: QEMU writes plaintext through the volume', r)
    _, ct = segment_bytes(vol, SIZE)
    dec = luks2.payload_crypt(hdr, key, ct, 0, False)
    check(dec == plain, f'{desc}: the oracle decrypts what QEMU wrote')
    check(plain[:4096] not in ct, f'{desc}: the payload holds no plaintext')

    # The oracle encrypts, QEMU reads
    plain2 = os.urandom(SIZE)
    seg = hdr.segment()
    ct2 = luks2.payload_crypt(hdr, key, plain2, 0, True)
    with open(vol['payload'], 'r+b') as f:
        f.seek(int(seg['offset']))
        f.write(ct2)
    r = read_volume('key1', vol_spec(vol), 'out.raw')
    check(r.ok and read('out.raw') == plain2,
          f'{desc}: QEMU reads what the oracle encrypted', r)

    if CRYPTSETUP:
        args = ['luksDump', '--dump-volume-key', '-q', '--key-file', 'key1',
                path]
        r = run([CRYPTSETUP] + args)
        hexkey = ''.join(r.out.split('MK dump:', 1)[-1].split()[:len(key)])
        check(r.ok and hexkey == key.hex(), f'{desc}: cryptsetup dumps the '
              f'same volume key', r)
    return key


def create(desc, name, kdf, sector, cipher, detached):
    vol = {'payload': f'{name}.img', 'header': None}
    opts = f'key-secret=sec0,version=2,{FAST[kdf]},{CIPHERS[cipher]},' \
        f'sector-size={sector}'
    if detached:
        vol['header'] = f'{name}.hdr'
        opts += ',detached-header=on'
        r = qemu_img('create', *objects(), '-f', 'luks', '-o', opts,
                     vol['header'])
        check(r.ok, f'{desc}: qemu-img create', r)
        r = qemu_img('create', '-f', 'raw', vol['payload'], str(SIZE))
    else:
        r = qemu_img('create', *objects(), '-f', 'luks', '-o', opts,
                     vol['payload'], str(SIZE))
        check(r.ok, f'{desc}: qemu-img create', r)
    return vol if r.ok else None


def test_create():
    n = 0
    volumes = []
    for detached in (False, True):
        for kdf, sector, cipher in (('pbkdf2', 512, 'aes-xts-plain64'),
                                    ('argon2i', 4096, 'aes-cbc-essiv:sha256'),
                                    ('argon2id', 4096, 'aes-xts-plain64'),
                                    ('argon2id', 512,
                                     'aes-cbc-essiv:sha256')):
            n += 1
            desc = (f"{'detached' if detached else 'attached'} {kdf} "
                    f"{sector}-byte sectors {cipher}")
            vol = create(desc, f'v{n}', kdf, sector, cipher, detached)
            if not vol:
                continue
            check_copies(desc, header_file(vol), seqid=1)
            hdr = luks2.Header(header_file(vol))
            seg = hdr.segment()
            ks = hdr.json['keyslots']['0']
            check(seg['sector_size'] == sector and
                  seg['encryption'] == cipher and
                  ks['kdf']['type'] == kdf and
                  int(seg['offset']) == (0 if detached else 16 * MiB),
                  f'{desc}: the metadata say what was asked for',
                  json.dumps(hdr.json, indent=1))
            key = check_volume(desc, vol)
            volumes.append((desc, vol, key))
    return volumes


def amend(vol, opts, key='key1', force=False):
    return qemu_img('amend', *(['--force'] if force else []), *objects(),
                    '-o', opts, vol_spec(vol, key))


def test_amend(desc, vol, key):
    seqid = check_copies(f'{desc}, before amending', header_file(vol))
    if seqid is None:
        return
    path = header_file(vol)
    steps = (
        ('add a PBKDF2 keyslot for key2',
         f"state=active,new-secret=sec1,{FAST['pbkdf2']}", 'key1',
         ['key1', 'key2'], ['key3']),
        ('add an Argon2id keyslot 20 for key3',
         f"state=active,new-secret=sec2,keyslot=20,{FAST['argon2id']}",
         'key2', ['key1', 'key2', 'key3'], []),
        ('erase the keyslot of key1', 'state=inactive,old-secret=sec0',
         'key2', ['key2', 'key3'], ['key1']),
        ('erase keyslot 20', 'state=inactive,keyslot=20', 'key2', ['key2'],
         ['key1', 'key3']),
    )
    for step, opts, opener, opening, refused in steps:
        r = amend(vol, opts, opener)
        check(r.ok, f'{desc}: {step}', r)
        seqid += 1
        check_copies(f'{desc}, after "{step}"', path, seqid)
        hdr = luks2.Header(path)
        if needs_argon2(hdr.json) and not HAVE_ARGON2:
            skip(f'{desc}, after "{step}": the oracle unlocks',
                 'python3-argon2 is missing')
            continue
        for name in opening:
            got = oracle_unlock(path, name)
            check(got is not None and (key is None or got[1] == key),
                  f'{desc}, after "{step}": the oracle unlocks the same '
                  f'volume key with {name}')
        for name in refused:
            check(oracle_unlock(path, name) is None,
                  f'{desc}, after "{step}": the oracle refuses {name}')
    # The last keyslot stays
    refuses(f'{desc}: erasing the last keyslot',
            [QEMU_IMG, 'amend', *objects(), '-o',
             'state=inactive,old-secret=sec1', vol_spec(vol, 'key2')],
            'irreversibly - refusing operation', [path])
    r = read_volume('key2', vol_spec(vol, 'key1'), 'out.raw')
    hdr = luks2.Header(path)
    _, ct = segment_bytes(vol, SIZE)
    if key is not None:
        check(r.ok and read('out.raw') ==
              luks2.payload_crypt(hdr, key, ct, 0, False),
              f'{desc}: after the amends, QEMU and the oracle read the same '
              f'plaintext', r)


def blkdebug_spec(vol, sector):
    target = vol['header'] or vol['payload']
    node = {'driver': 'blkdebug',
            'inject-error': [{'event': 'pwritev', 'iotype': 'write',
                              'sector': sector, 'once': True}],
            'image': {'driver': 'file', 'filename': target}}
    opts = {'driver': 'luks', 'key-secret': 'sec0'}
    if vol['header']:
        opts['header'] = node
        opts['file'] = {'filename': vol['payload']}
    else:
        opts['file'] = node
    return 'json:' + json.dumps(opts)


def test_failures():
    """An error in each write of an amend: the copy the oracle takes
    opens with the old passphrases or the new ones, and QEMU agrees"""
    for detached in (False, True):
        kind = 'detached' if detached else 'attached'
        base = create(f'{kind} base for failures', f'f{kind}', 'pbkdf2',
                      512, 'aes-xts-plain64', detached)
        if not base:
            continue
        r = amend(base, f"state=active,new-secret=sec1,{FAST['pbkdf2']}")
        check(r.ok, f'{kind}: a second keyslot for the failure tests', r)
        path = header_file(base)
        meta = luks2.Header(path).json
        area1 = int(meta['keyslots']['1']['area']['offset'])
        area2 = area1 + int(meta['keyslots']['1']['area']['size'])
        saved = read(path)
        cases = (
            ('add: key material', area2 // 512,
             f"state=active,new-secret=sec2,{FAST['pbkdf2']}",
             {'key1': True, 'key2': True, 'key3': False}),
            ('add: secondary copy', 32,
             f"state=active,new-secret=sec2,{FAST['pbkdf2']}",
             {'key1': True, 'key2': True, 'key3': False}),
            ('add: primary copy', 0,
             f"state=active,new-secret=sec2,{FAST['pbkdf2']}",
             {'key1': True, 'key2': True, 'key3': True}),
            ('erase: secondary copy', 32, 'state=inactive,keyslot=1',
             {'key1': True, 'key2': True}),
            ('erase: primary copy', 0, 'state=inactive,keyslot=1',
             {'key1': True, 'key2': False}),
            ('erase: wiping', area1 // 512, 'state=inactive,keyslot=1',
             {'key1': True, 'key2': False}),
        )
        for step, sector, opts, want in cases:
            desc = f'{kind}, the write of {step} fails'
            write(path, saved)
            r = qemu_img('amend', *objects(), '-o', opts,
                         blkdebug_spec(base, sector))
            check(r.refused, f'{desc}: amend fails', r)
            (p, why_p), (s, why_s) = copies(path)
            check(p is not None or s is not None,
                  f'{desc}: a copy of the header is valid',
                  f'{why_p}; {why_s}')
            oracle = {k: oracle_unlock(path, k) is not None for k in want}
            check(oracle == want, f'{desc}: the oracle opens with '
                  f'{sorted(k for k in want if want[k])} only', oracle)
            qemu = {}
            for k in want:
                rr = qemu_io(*objects(), '-c', 'read 0 512',
                             vol_spec(base, k))
                qemu[k] = rr.ok
            check(qemu == oracle, f'{desc}: QEMU agrees with the oracle',
                  qemu)


def test_unknown_metadata():
    """Metadata that QEMU doesn't interpret, written by the oracle, survive
    an amend exactly"""
    vol = create('unknown metadata', 'u', 'pbkdf2', 512, 'aes-xts-plain64',
                 True)
    if not vol:
        return
    path = vol['header']
    meta = luks2.Header(path).json
    meta['tokens']['0'] = {'type': 'x-oracle', 'keyslots': ['0'],
                           'data': {'text': 'gr\u00fc\u00dfe \U0001f512',
                                    'n': 18446744073709551615,
                                    'x': [None, True, 1.25, {}]}}
    meta['config']['flags'] = ['allow-discards']
    meta['keyslots']['0']['x-oracle'] = 'kept'
    meta['x-oracle'] = {'nested': [1, 2, {'deeper': 'yes'}]}
    luks2.set_json(path, meta)
    seqid = check_copies('unknown metadata, written by the oracle', path)
    before = luks2.Header(path).json
    r = amend(vol, f"state=active,new-secret=sec1,{FAST['pbkdf2']}")
    check(r.ok, 'unknown metadata: QEMU adds a keyslot', r)
    check_copies('unknown metadata, after the amend', path,
                 seqid + 1 if seqid else None)
    after = luks2.Header(path).json
    expect = json.loads(json.dumps(before))
    expect['keyslots']['1'] = after['keyslots'].get('1')
    expect['digests']['0']['keyslots'].append('1')
    check(after == expect, 'unknown metadata: everything but the new '
          'keyslot and its digest binding is as it was',
          json.dumps(after, sort_keys=True))
    r = amend(vol, 'state=inactive,old-secret=sec0', key='key2')
    check(r.ok, 'unknown metadata: QEMU erases the keyslot a token names', r)
    after2 = luks2.Header(path).json
    expect = json.loads(json.dumps(after))
    del expect['keyslots']['0']
    expect['digests']['0']['keyslots'].remove('0')
    expect['tokens']['0']['keyslots'].remove('0')
    check(after2 == expect, 'unknown metadata: the erase drops the keyslot '
          'from the digest and the token, and changes nothing else',
          json.dumps(after2, sort_keys=True))
    check(oracle_unlock(path, 'key2') is not None and
          oracle_unlock(path, 'key1') is None,
          'unknown metadata: the oracle unlocks with key2, not key1')


def test_refusals():
    vol = create('refusals', 'r', 'pbkdf2', 512, 'aes-xts-plain64', False)
    if not vol:
        return
    refuses('qcow2 with LUKS version 2',
            [QEMU_IMG, 'create', *objects(), '-f', 'qcow2', '-o',
             'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.version=2',
             'q.qcow2', '1M'],
            'qcow2 images are encrypted with LUKS version 1 only',
            ['q.qcow2', 'r.img'])
    refuses('LUKS version 3',
            [QEMU_IMG, 'create', *objects(), '-f', 'luks', '-o',
             'key-secret=sec0,version=3', 'bad.img', '1M'],
            'LUKS version 3 is not supported', ['bad.img', 'r.img'])
    refuses('a keyslot whose KDF is past the open limit',
            [QEMU_IMG, 'amend', *objects(), '-o',
             'state=active,new-secret=sec1,kdf-memory=1048576,'
             'kdf-iterations=32', vol_spec(vol)],
            'more than the limit of 268435456', ['r.img'])
    refuses('a keyslot whose Argon2 memory is past the open limit',
            [QEMU_IMG, 'amend', *objects(), '-o',
             'state=active,new-secret=sec1,kdf-memory=4194304,'
             'kdf-iterations=4', vol_spec(vol)],
            'would be refused when the volume is opened', ['r.img'])
    refuses('an active keyslot',
            [QEMU_IMG, 'amend', *objects(), '-o',
             f"state=active,new-secret=sec1,keyslot=0,{FAST['pbkdf2']}",
             vol_spec(vol)],
            'Refusing to overwrite active keyslot 0', ['r.img'])


def test_newer_copy_refused():
    """A newer copy that only QEMU refuses is never overwritten by an
    amend with the older copy's metadata: cryptsetup may use it"""
    if not CRYPTSETUP:
        skip('a newer copy refused by QEMU', 'cryptsetup is missing')
        return
    vol = 'newer.img'
    with open(vol, 'wb') as f:
        f.truncate(4 * MiB)
    r = run([CRYPTSETUP, 'luksFormat', '--type', 'luks2', '--batch-mode',
             '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000',
             '--luks2-metadata-size', '16k', '--luks2-keyslots-size', '1m',
             '--key-file', 'key1', vol])
    check(r.ok, 'newer copy: cryptsetup formats the volume', r)
    hdr_size = 16 * KiB
    with open(vol, 'rb') as f:
        older = f.read(hdr_size)        # keyslot 0 only
    r = run([CRYPTSETUP, 'luksAddKey', '--batch-mode', '--pbkdf', 'pbkdf2',
             '--pbkdf-force-iterations', '1000', '--key-file', 'key1', vol,
             'key2'])
    check(r.ok, 'newer copy: cryptsetup adds keyslot 1', r)
    with open(vol, 'rb') as f:
        newer = f.read(2 * hdr_size)[hdr_size:]
    # The newer copy holds what cryptsetup reads with strtoull() and
    # QEMU, reading a decimal number, refuses
    meta = json.loads(newer[luks2.BIN_SIZE:].rstrip(b'\0'))
    meta['config']['keyslots_size'] = ' ' + meta['config']['keyslots_size']
    with open(vol, 'r+b') as f:
        f.write(older)
        f.write(luks2.build_copy(newer, meta, hdr_size, True))
    shutil.copy(vol, 'newer-copy.img')
    r = run([CRYPTSETUP, 'open', '--test-passphrase', '--key-file', 'key2',
             'newer-copy.img'])
    check(r.ok, 'newer copy: cryptsetup opens keyslot 1 of the newer copy',
          r)
    refuses('newer copy: an amend',
            [QEMU_IMG, 'amend', *objects(), '-o',
             f"state=active,new-secret=sec2,{FAST['pbkdf2']}",
             spec(vol)],
            'Cannot amend the LUKS2 volume: its secondary copy, of sequence '
            'id', [vol])
    r = run([CRYPTSETUP, 'open', '--test-passphrase', '--key-file', 'key2',
             vol])
    check(r.ok, 'newer copy: after the refused amend cryptsetup still '
          'opens keyslot 1', r)


def test_token_bytes_kept():
    """A token that cryptsetup imports with a byte that is not UTF-8, and
    with a duplicate key, comes out of a QEMU amend as cryptsetup reads
    it"""
    if not CRYPTSETUP:
        skip('a token with a Latin-1 byte', 'cryptsetup is missing')
        return
    vol = 'latin1.img'
    with open(vol, 'wb') as f:
        f.truncate(4 * MiB)
    r = run([CRYPTSETUP, 'luksFormat', '--type', 'luks2', '--batch-mode',
             '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000',
             '--key-file', 'key1', vol])
    check(r.ok, 'Latin-1 token: cryptsetup formats the volume', r)
    write('token.json', b'{"type":"x-test","keyslots":[],"text":"caf\xe9",'
          b'"k":"first","k":"second"}')
    r = run([CRYPTSETUP, 'token', 'import', '--token-id', '0',
             '--json-file', 'token.json', vol])
    check(r.ok, 'Latin-1 token: cryptsetup imports it', r)
    export = [CRYPTSETUP, 'token', 'export', '--token-id', '0', vol]
    # The bytes as they are (run() decodes the output)
    before = subprocess.run(export, stdout=subprocess.PIPE, check=False)
    r = amend({'payload': vol, 'header': None},
              f"state=active,new-secret=sec1,{FAST['pbkdf2']}")
    check(r.ok, 'Latin-1 token: QEMU adds a keyslot', r)
    after = subprocess.run(export, stdout=subprocess.PIPE, check=False)
    # Members keep their values byte for byte, not their order
    check(b'"caf\xe9"' in before.stdout and b'"k":"second"' in before.stdout
          and json.loads(after.stdout.decode('latin-1')) ==
          json.loads(before.stdout.decode('latin-1')),
          'Latin-1 token: cryptsetup exports the same members, byte for '
          'byte, after the amend',
          f'before: {before.stdout!r}\nafter: {after.stdout!r}')
    r = run([CRYPTSETUP, 'open', '--test-passphrase', '--key-file', 'key2',
             vol])
    check(r.ok, 'Latin-1 token: cryptsetup opens the keyslot QEMU added', r)


def test_measure():
    r = qemu_img('measure', '-O', 'luks', '-o', 'version=2', '--size', '64M')
    check(r.ok and 'required size: %d' % (80 * MiB) in r.out,
          'qemu-img measure: 64 MiB of LUKS2 payload take 80 MiB', r)
    r = qemu_img('measure', '-O', 'luks', '-o',
                 'version=2,detached-header=on', '--size', '64M')
    check(r.ok and 'required size: %d' % (16 * MiB) in r.out,
          'qemu-img measure: a detached LUKS2 header takes 16 MiB', r)


def main():
    if not HAVE_ARGON2:
        diag('python3-argon2 is missing: Argon2 keyslots are not unlocked '
             'by the oracle')
    if not CRYPTSETUP:
        diag('cryptsetup is missing: its checks are skipped')
    volumes = test_create()
    for desc, vol, key in volumes:
        if 'detached pbkdf2' in desc or 'attached argon2id 4096' in desc:
            test_amend(desc, vol, key)
    test_failures()
    test_unknown_metadata()
    test_refusals()
    test_newer_copy_refused()
    test_token_bytes_kept()
    test_measure()
    tap.done()


main()
