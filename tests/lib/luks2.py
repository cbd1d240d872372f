#!/usr/bin/env python3
#
# An independent reader of LUKS2 volumes, as a test oracle.
#
# It implements what it needs of the LUKS2 on-disk format (cryptsetup's
# docs/on-disk-format-luks2.pdf) from the specification, sharing no
# code with QEMU or cryptsetup: it parses the binary header and JSON
# metadata, unlocks the volume key of a keyslot with a passphrase
# (PBKDF2 through hashlib, Argon2 through argon2-cffi's low-level API,
# the LUKS1 anti-forensic merge, keyslot area decryption, digest
# check), and encrypts or decrypts payload sectors as dm-crypt does
# (aes-xts-plain64, aes-cbc-essiv:sha256, aes-cbc-plain64; 512 to 4096-
# byte sectors, IVs in 512-byte units from the start of the segment; the
# segment's iv_tweak plays no part, as 'cryptsetup open' maps a single
# segment with an IV offset of 0 whatever iv_tweak says).
#
# The anti-forensic merge, PBKDF2 and the pieces of the sector ciphers
# (AES modes, IV numbers) are luks_common.py's, shared with luks1.py;
# the binary header, checksums and header copies are those of the
# iotests' luks2_format.py, in the QEMU tree (tests/qemu-iotests).
#
# Needs python3-cryptography (imported when a cipher is first made), and
# python3-argon2 for Argon2 keyslots.
#
# Usage:
#   luks2.py dump HEADER
#   luks2.py volume-key HEADER PASSFILE
#   luks2.py encrypt HEADER PASSFILE IN OUT [--sector N] [--key-hex K]
#   luks2.py decrypt HEADER PASSFILE IN OUT [--sector N] [--key-hex K]
#   luks2.py set-json HEADER JSONFILE      (rewrite both copies)
#   luks2.py selftest
#
# encrypt and decrypt work on payload bytes: IN and OUT hold whole
# sectors of the data segment, the first of which is sector N (0 by
# default) counted from the start of the segment.  HEADER may be a
# detached header or a whole volume.
#
# Copyright (C) 2026 Detached Header Team <luks-detached@example.org>
#
# This program is free software; you can redistribute it and/or modify
# it under the terms of the GNU General Public License as published by
# the Free Software Foundation; either version 2 of the License, or
# (at your option) any later version.

import argparse
import base64
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import luks2_format
from luks2_format import BIN_SIZE, CSUM_OFFSET, HDR_SIZES, Copy  # noqa: F401
from luks_common import aes, af_merge, crypt_sectors, essiv, iv_plain, iv_plain64, pbkdf2

SECTOR = 512
LUKS2Error = luks2_format.LUKS2FormatError
_cstr = luks2_format.cstr
checksum = luks2_format.checksum


def build_copy(template, metadata, offset, secondary):
    """A header copy like @template (bytes) with JSON @metadata"""
    text = json.dumps(metadata, separators=(',', ':')).encode()
    return luks2_format.build_copy(template, text, offset, secondary)


class Header:
    def __init__(self, path):
        with open(path, 'rb') as f:
            data = f.read(2 * max(HDR_SIZES))
        self.path = path
        self.errors = {}
        copies = []
        try:
            copies.append(Copy(data, 0, False))
        except (LUKS2Error, ValueError) as e:
            self.errors['primary'] = str(e)
        size = copies[0].hdr_size if copies else None
        for off in ([size] if size else HDR_SIZES):
            try:
                copies.append(Copy(data[off:], off, True))
                break
            except (LUKS2Error, ValueError) as e:
                self.errors['secondary'] = str(e)
        if not copies:
            raise LUKS2Error(f'no valid header copy: {self.errors}')
        best = max(copies, key=lambda c: c.seqid)
        self.copy = best
        self.json = best.json
        self.hdr_size = best.hdr_size
        self.uuid = best.uuid
        self.label = best.label
        self.data = data

    def segment(self):
        segs = self.json['segments']
        if list(segs) != ['0']:
            raise LUKS2Error('only single-segment volumes are supported')
        seg = segs['0']
        if seg['type'] != 'crypt' or 'integrity' in seg:
            raise LUKS2Error('unsupported segment')
        return seg

    def digest(self):
        for _, dig in sorted(self.json['digests'].items(),
                             key=lambda kv: int(kv[0])):
            if '0' in dig['segments']:
                return dig
        raise LUKS2Error('no digest for segment 0')

    def read(self, offset, length):
        if offset + length <= len(self.data):
            return self.data[offset:offset + length]
        with open(self.path, 'rb') as f:
            f.seek(offset)
            return f.read(length)


def parse_cipher(spec):
    """'aes-xts-plain64' -> ('aes', 'xts', 'plain64', ivhash)"""
    cipher, mode, iv = spec.split('-', 2)
    ivhash = None
    if ':' in iv:
        iv, ivhash = iv.split(':', 1)
    if cipher != 'aes' or mode not in ('xts', 'cbc', 'ecb'):
        raise LUKS2Error(f'cipher {spec} not supported by the oracle')
    return cipher, mode, iv, ivhash


class SectorCipher:
    """dm-crypt's sector encryption for a cipher spec and key"""

    def __init__(self, spec, key):
        self.cipher, self.mode, self.iv, self.ivhash = parse_cipher(spec)
        self.key = key
        if self.iv == 'essiv':
            self.essiv = essiv(self.ivhash, key)

    def iv_for(self, n):
        n &= (1 << 64) - 1
        if self.iv == 'plain64':
            return iv_plain64(n)
        if self.iv == 'plain':
            return iv_plain(n)
        if self.iv == 'essiv':
            return self.essiv(n)
        raise LUKS2Error(f'IV generator {self.iv} not supported')

    def cipher_for(self, ivnum):
        """The cryptography Cipher of the sector with IV number @ivnum"""
        if self.mode in ('xts', 'cbc'):
            return aes(self.key, self.mode, self.iv_for(ivnum))
        return aes(self.key, 'ecb')

    def run(self, data, sector_size, first_iv, iv_step, encrypt):
        if len(data) % sector_size:
            raise LUKS2Error('data is not whole sectors')
        return crypt_sectors(self.cipher_for, data, sector_size, first_iv,
                             iv_step, encrypt)


def kdf(ks, passphrase):
    k = ks['kdf']
    salt = base64.b64decode(k['salt'])
    n = ks['area']['key_size']
    if k['type'] == 'pbkdf2':
        return pbkdf2(k['hash'], passphrase, salt, k['iterations'], n)
    if k['type'] in ('argon2i', 'argon2id'):
        try:
            from argon2.low_level import hash_secret_raw, Type
        except ImportError as e:
            raise LUKS2Error('Argon2 keyslots need argon2-cffi '
                             '(python3-argon2)') from e
        t = Type.I if k['type'] == 'argon2i' else Type.ID
        return hash_secret_raw(passphrase, salt, time_cost=k['time'],
                               memory_cost=k['memory'],
                               parallelism=k['cpus'], hash_len=n, type=t,
                               version=19)
    raise LUKS2Error(f"KDF {k['type']} not supported")


def check_digest(dig, key):
    want = base64.b64decode(dig['digest'])
    got = pbkdf2(dig['hash'], key, base64.b64decode(dig['salt']),
                 dig['iterations'], len(want))
    return got == want


def unlock(hdr, passphrase):
    """Returns (keyslot id, volume key) for @passphrase"""
    dig = hdr.digest()
    if dig['type'] != 'pbkdf2':
        raise LUKS2Error('digest type not supported')
    slots = hdr.json['keyslots']

    def prio(sid):
        return int(slots[sid].get('priority', 1))
    order = sorted((s for s in dig['keyslots'] if prio(s) > 0),
                   key=lambda s: (-prio(s), int(s)))
    for sid in order:
        ks = slots[sid]
        if ks['type'] != 'luks2' or ks['af']['type'] != 'luks1':
            continue
        key_size = ks['key_size']
        stripes = ks['af']['stripes']
        area = ks['area']
        length = -(-key_size * stripes // SECTOR) * SECTOR
        material = hdr.read(int(area['offset']), length)
        sc = SectorCipher(area['encryption'], kdf(ks, passphrase))
        plain = sc.run(material, SECTOR, 0, 1, False)
        key = af_merge(plain, key_size, stripes, ks['af']['hash'])
        if check_digest(dig, key):
            return int(sid), key
    raise LUKS2Error('no keyslot opens with this passphrase')


def payload_crypt(hdr, key, data, first_sector, encrypt):
    seg = hdr.segment()
    ss = seg['sector_size']
    sc = SectorCipher(seg['encryption'], key)
    step = ss // SECTOR     # dm-crypt counts IVs in 512-byte units
    # cryptsetup maps one segment with IV offset 0: iv_tweak is ignored
    first_iv = first_sector * step
    return sc.run(data, ss, first_iv, step, encrypt)


def dump(hdr):
    seg = hdr.segment()
    print(f'header size: {hdr.hdr_size}')
    print(f'uuid: {hdr.uuid}')
    print(f'label: {hdr.label}')
    for name, why in sorted(hdr.errors.items()):
        print(f'{name} copy: damaged ({why})')
    print(f"segment: offset {seg['offset']} size {seg['size']} "
          f"sector {seg['sector_size']} iv_tweak {seg['iv_tweak']} "
          f"encryption {seg['encryption']}")
    for sid, ks in sorted(hdr.json['keyslots'].items(),
                          key=lambda kv: int(kv[0])):
        k = ks.get('kdf', {})
        params = ', '.join(f'{p}={k[p]}' for p in
                           ('hash', 'iterations', 'time', 'memory', 'cpus')
                           if p in k)
        print(f"keyslot {sid}: {ks['type']} key_size {ks['key_size']} "
              f"kdf {k.get('type')} ({params}) priority "
              f"{ks.get('priority', 1)} area {ks['area']['encryption']} "
              f"at {ks['area']['offset']}+{ks['area']['size']}")


def read_pass(path):
    with open(path, 'rb') as f:
        data = f.read()
    return data


def set_json(path, metadata):
    """Rewrite both header copies of @path with @metadata"""
    hdr = Header(path)
    size = hdr.hdr_size
    raw = hdr.copy.raw
    seqid = hdr.copy.seqid + 1
    template = bytearray(raw[:BIN_SIZE])
    struct.pack_into('>Q', template, 16, seqid)
    primary = build_copy(template, metadata, 0, False)
    secondary = build_copy(template, metadata, size, True)
    with open(path, 'r+b') as f:
        f.write(primary)
        f.seek(size)
        f.write(secondary)


def have_argon2():
    try:
        import argon2.low_level  # noqa: F401 pylint: disable=unused-import
        return True
    except ImportError:
        return False


def selftest():
    """Checks the oracle against cryptsetup's opinion of the volume key"""
    if not shutil.which('cryptsetup'):
        print('selftest: cryptsetup not found, skipped')
        return 0
    failures = skipped = 0
    cases = [
        ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000',
         '--cipher', 'aes-xts-plain64', '--key-size', '512',
         '--sector-size', '512'],
        ['--pbkdf', 'argon2id', '--pbkdf-memory', '32',
         '--pbkdf-force-iterations', '4', '--pbkdf-parallel', '1',
         '--cipher', 'aes-xts-plain64', '--key-size', '256',
         '--sector-size', '4096'],
        ['--pbkdf', 'argon2i', '--pbkdf-memory', '64',
         '--pbkdf-force-iterations', '4', '--pbkdf-parallel', '2',
         '--cipher', 'aes-cbc-essiv:sha256', '--key-size', '256',
         '--sector-size', '512', '--hash', 'sha512'],
    ]
    with tempfile.TemporaryDirectory() as tmp:
        passfile = os.path.join(tmp, 'pass')
        with open(passfile, 'wb') as f:
            f.write(b'oracle passphrase')
        for i, opts in enumerate(cases):
            hdrfile = os.path.join(tmp, f'hdr{i}')
            for path in (hdrfile, hdrfile + '.data'):
                with open(path, 'wb') as f:
                    f.truncate(4 << 20)
            subprocess.run(['cryptsetup', 'luksFormat', '-q', '--type',
                            'luks2', '--key-file', passfile,
                            '--luks2-metadata-size', '16k',
                            '--luks2-keyslots-size', '1m', '--header',
                            hdrfile, *opts, hdrfile + '.data'],
                           check=True, capture_output=True)
            out = subprocess.run(['cryptsetup', 'luksDump',
                                  '--dump-volume-key', '-q', '--key-file',
                                  passfile, hdrfile], check=True,
                                 capture_output=True, text=True).stdout
            tokens = out.split('MK dump:', 1)[1].split()
            hexkey = ''
            for tok in tokens:
                if len(tok) != 2 or any(c not in '0123456789abcdef'
                                        for c in tok):
                    break
                hexkey += tok
            hdr = Header(hdrfile)
            if 'argon2' in opts[1] and not have_argon2():
                print(f'selftest case {i}: skipped, argon2-cffi missing')
                skipped += 1
                continue
            _, key = unlock(hdr, read_pass(passfile))
            ok = key.hex() == hexkey
            # A round trip through both directions must be the identity
            # and must not be the identity cipher
            plain = os.urandom(3 * 4096)
            ct = payload_crypt(hdr, key, plain, 5, True)
            ok = ok and ct != plain and \
                payload_crypt(hdr, key, ct, 5, False) == plain
            print(f"selftest case {i}: {'ok' if ok else 'FAILED'}")
            failures += not ok
    # A known answer: IEEE P1619 XTS-AES-128 vector 4 (data unit 0)
    key = bytes.fromhex('2718281828459045235360287471352631415926535897932'
                        '384626433832795')
    pt = bytes(range(256)) * 2
    ct = SectorCipher('aes-xts-plain64', key).run(pt, 512, 0, 1, True)
    ok = ct[:16].hex() == '27a7479befa1d476489f308cd4cfa6e2'
    print(f"selftest xts known answer: {'ok' if ok else 'FAILED'}")
    failures += not ok
    print(f'{len(cases) + 1 - failures - skipped} passed, {failures} failed, '
          f'{skipped} skipped')
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description='LUKS2 test oracle')
    sub = ap.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('dump')
    p.add_argument('header')
    p = sub.add_parser('volume-key')
    p.add_argument('header')
    p.add_argument('passfile')
    for name in ('encrypt', 'decrypt'):
        p = sub.add_parser(name)
        p.add_argument('header')
        p.add_argument('passfile')
        p.add_argument('infile')
        p.add_argument('outfile')
        p.add_argument('--sector', type=int, default=0)
        p.add_argument('--key-hex')
    p = sub.add_parser('set-json')
    p.add_argument('header')
    p.add_argument('jsonfile')
    sub.add_parser('selftest')
    args = ap.parse_args()

    try:
        if args.cmd == 'selftest':
            return selftest()
        hdr = Header(args.header)
        if args.cmd == 'dump':
            dump(hdr)
        elif args.cmd == 'volume-key':
            sid, key = unlock(hdr, read_pass(args.passfile))
            print(f'keyslot {sid}: {key.hex()}')
        elif args.cmd in ('encrypt', 'decrypt'):
            if args.key_hex:
                key = bytes.fromhex(args.key_hex)
            else:
                _, key = unlock(hdr, read_pass(args.passfile))
            with open(args.infile, 'rb') as f:
                data = f.read()
            out = payload_crypt(hdr, key, data, args.sector,
                                args.cmd == 'encrypt')
            with open(args.outfile, 'wb') as f:
                f.write(out)
        elif args.cmd == 'set-json':
            with open(args.jsonfile) as f:
                set_json(args.header, json.load(f))
    except LUKS2Error as e:
        print(f'luks2.py: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
