#!/usr/bin/python3
"""An independent LUKS1 reader for the tests: header parsing, key-slot
unlocking and payload encryption, written from the LUKS1 On-Disk Format
Specification 1.2.3 (cryptsetup's docs/on-disk-format.pdf).

Nothing here calls QEMU or cryptsetup.  It uses AES (ECB, CBC and XTS)
from Debian's python3-cryptography and PBKDF2-HMAC and the hashes from
hashlib; run it with /usr/bin/python3.  The sector IVs (plain, plain64,
essiv:HASH) and the anti-forensic merge (AFmerge with the H1 diffusion of
the header's hash), which luks2.py uses too, are in luks_common.py; the
cipher names, key slots and the master-key digest check are built here
from the specification.

What it does:
  parse a phdr (read_header), recover the master key from a passphrase
  (unlock: PBKDF2 per active slot, key-material decryption with the
  header's cipher mode from the slot's key-material offset, sector 0 at
  that offset, AFmerge, digest check), encrypt and decrypt payload sectors
  with a known key (crypt), and edit single header fields (set_field) to
  make damaged headers.
What it does not do: write a header or a key slot, LUKS2, or any cipher
  other than AES (the other names of the specification are refused).
Its self-test (selftest()) checks AES-XTS-plain64 against IEEE 1619,
  AES-CBC-ESSIV:SHA256 against known answers from cryptsetup and from the
  definition, and AES-CBC-plain/plain64 past sector 2^32 (see VECTORS).

Command line (for looking at a header by hand):
  luks1.py dump HEADER               the parsed header
  luks1.py unlock HEADER KEYFILE     the master key, in hex
  luks1.py selftest                  the known-answer tests
"""

import struct
import sys

from luks_common import aes, af_merge, crypt_sectors, essiv, iv_plain, iv_plain64, pbkdf2

SECTOR = 512
MAGIC = b'LUKS\xba\xbe'
KEY_ENABLED, KEY_DISABLED = 0x00AC71F3, 0x0000DEAD
DIGEST_SIZE, SALT_SIZE, SLOTS = 20, 32, 8
PHDR_SIZE = 592

# Header fields: name -> (offset, struct format), from figures 1 and 2.
FIELDS = {
    'magic': (0, '6s'), 'version': (6, '>H'),
    'cipher-name': (8, '32s'), 'cipher-mode': (40, '32s'),
    'hash-spec': (72, '32s'), 'payload-offset': (104, '>I'),
    'key-bytes': (108, '>I'), 'mk-digest': (112, '20s'),
    'mk-salt': (132, '32s'), 'mk-iterations': (164, '>I'),
    'uuid': (168, '40s'),
}
SLOT_BASE, SLOT_SIZE = 208, 48
SLOT_FIELDS = {
    'active': (0, '>I'), 'iterations': (4, '>I'), 'salt': (8, '32s'),
    'key-offset': (40, '>I'), 'stripes': (44, '>I'),
}


def field(name):
    """(offset, format) of a header field, or of slotN.FIELD (N = 0..7)."""
    if name.startswith('slot') and '.' in name:
        n, sub = name[4:].split('.', 1)
        off, fmt = SLOT_FIELDS[sub]
        return SLOT_BASE + SLOT_SIZE * int(n) + off, fmt
    return FIELDS[name]


def cstr(raw):
    return raw.split(b'\0', 1)[0].decode('ascii', 'replace')


class Header:
    """A parsed LUKS1 phdr.  Text fields are str, payload_offset is in
    sectors, slots a list of dicts (active: bool, plus the raw fields)."""

    def __init__(self, data):
        if len(data) < PHDR_SIZE:
            raise ValueError('a LUKS1 header is %d bytes, got %d' % (PHDR_SIZE, len(data)))

        def get(name):
            off, fmt = field(name)
            return struct.unpack_from(fmt, data, off)[0]
        self.magic, self.version = get('magic'), get('version')
        if self.magic != MAGIC:
            raise ValueError('no LUKS magic')
        if self.version != 1:
            raise ValueError('LUKS version %d, not 1' % self.version)
        self.cipher_name = cstr(get('cipher-name'))
        self.cipher_mode = cstr(get('cipher-mode'))
        self.hash_spec = cstr(get('hash-spec'))
        self.payload_offset = get('payload-offset')
        self.key_bytes = get('key-bytes')
        self.mk_digest, self.mk_salt = get('mk-digest'), get('mk-salt')
        self.mk_iterations = get('mk-iterations')
        self.uuid = cstr(get('uuid'))
        self.slots = []
        for i in range(SLOTS):
            s = {k: get('slot%d.%s' % (i, k)) for k in SLOT_FIELDS}
            s['active'] = s['active'] == KEY_ENABLED
            self.slots.append(s)

    def __str__(self):
        lines = ['%s: %s' % (k, v) for k, v in vars(self).items() if k != 'slots']
        lines += ['slot %d: %s' % (i, {k: (v.hex() if isinstance(v, bytes) else v)
                                       for k, v in s.items()})
                  for i, s in enumerate(self.slots)]
        return '\n'.join(lines)


def read_header(path):
    with open(path, 'rb') as f:
        return Header(f.read(PHDR_SIZE))


# --- sector encryption -------------------------------------------------------
def sector_ciphers(cipher_name, cipher_mode, key):
    """A function: sector number -> a cryptography Cipher for that sector,
    for a LUKS1 cipher name and mode (table 2 of the specification)."""
    if cipher_name != 'aes':
        raise ValueError('cipher %r: only aes is implemented' % cipher_name)
    chain, _, ivgen = cipher_mode.partition('-')
    ivgen, _, iv_hash = ivgen.partition(':')
    if chain == 'ecb' and not ivgen:
        return lambda sector: aes(key, 'ecb')
    if chain in ('xts', 'cbc') and ivgen in ('plain', 'plain64'):
        # plain: 32 bits, little-endian; plain64: 64 bits
        number = iv_plain if ivgen == 'plain' else iv_plain64
        return lambda sector: aes(key, chain, number(sector))
    if chain == 'cbc' and ivgen == 'essiv':
        # ESSIV: the IV is the sector number encrypted with the hash of the
        # key as key (same cipher), so IVs can't be predicted.
        iv = essiv(iv_hash, key)
        return lambda sector: aes(key, 'cbc', iv(sector))
    raise ValueError('cipher mode %r is not implemented' % cipher_mode)


def crypt(encrypt, cipher_name, cipher_mode, key, data, first_sector=0):
    """Encrypt or decrypt data (whole 512-byte sectors), sector by sector,
    the first being sector number first_sector."""
    if len(data) % SECTOR:
        raise ValueError('%d bytes are not whole sectors' % len(data))
    make = sector_ciphers(cipher_name, cipher_mode, key)
    return crypt_sectors(make, data, SECTOR, first_sector, 1, encrypt)


# --- key slots -----------------------------------------------------------------
# AFmerge (with H1, diffuse()) and PBKDF2 are luks_common's.


def key_is_master(hdr, key):
    """The master-key check: PBKDF2 of the candidate with the header's
    digest salt and iterations equals the stored digest."""
    return pbkdf2(hdr.hash_spec, key, hdr.mk_salt, hdr.mk_iterations,
                  DIGEST_SIZE) == hdr.mk_digest


def open_slot(hdr, image, slot, passphrase):
    """The master key candidate that slot yields for passphrase (bytes);
    image is the header file's content (key material included)."""
    s = hdr.slots[slot]
    n = hdr.key_bytes * s['stripes']
    start = s['key-offset'] * SECTOR
    sectors = -(-n // SECTOR)
    enc = image[start:start + sectors * SECTOR]
    if len(enc) < sectors * SECTOR:
        raise ValueError('key material of slot %d is cut off' % slot)
    kek = pbkdf2(hdr.hash_spec, passphrase, s['salt'], s['iterations'], hdr.key_bytes)
    split = crypt(False, hdr.cipher_name, hdr.cipher_mode, kek, enc)[:n]
    return af_merge(split, hdr.key_bytes, s['stripes'], hdr.hash_spec)


def unlock(path, passphrase):
    """(slot, master key) for passphrase (bytes) from the LUKS1 header in
    path; ValueError if no active slot yields a key that passes the
    master-key check."""
    with open(path, 'rb') as f:
        image = f.read()
    hdr = Header(image)
    for i, s in enumerate(hdr.slots):
        if s['active']:
            key = open_slot(hdr, image, i, passphrase)
            if key_is_master(hdr, key):
                return i, key
    raise ValueError('no key slot opens with this passphrase')


# --- header editing ---------------------------------------------------------------
def set_field(path, name, value):
    """Write one field in place: an int, or bytes for the byte/char fields."""
    off, fmt = field(name)
    packed = struct.pack(fmt, value)
    with open(path, 'r+b') as f:
        f.seek(off)
        f.write(packed)


def get_field(path, name):
    off, fmt = field(name)
    with open(path, 'rb') as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


# --- known answers -------------------------------------------------------------------
# (cipher mode, key, sector, first 32 bytes of plaintext, first 32 bytes
# of ciphertext), hex.  Two blocks check the IV and the chaining; sector
# numbers past 2^32 tell 32-bit IVs from 64-bit ones.  Where they come from:
#  - xts-plain64: IEEE Std 1619-2007, XTS-AES-128 vector 2 (data unit
#    0x3333333333).
#  - cbc-essiv:sha256, sectors 0 and 249: key slot 0 of a header made by
#    Debian 12's cryptsetup 2.6.1 (luksFormat --type luks1 --cipher
#    aes-cbc-essiv:sha256 --key-size 256 --hash sha256
#    --pbkdf-force-iterations 1000, passphrase "essiv vector").  The key is
#    the slot's PBKDF2 output, the ciphertext cryptsetup's encryption of
#    the split key at key-material sectors 0 and 249 (the last), the
#    plaintext what this module decrypts there; that decryption merges to
#    a master key that passes the header's digest check and equals
#    cryptsetup's --dump-volume-key, which wrong IVs could not give.
#  - cbc-essiv:sha256 at sector 2^32 + 1, cbc-plain and cbc-plain64 at the
#    same sector (key 00 01 ..., plaintext 00 01 ... 1f): computed from the
#    definitions with the openssl command line, not with this module
#    (ESSIV: salt = sha256(key), IV = aes-256-ecb(salt, LE64(sector) ||
#    8 zero bytes); plain: IV = LE32(sector) || 12 zero bytes; plain64:
#    LE64(sector) || 8 zero bytes).  NOTES-tests.md has the commands.
CS_ESSIV_KEY = 'aa90681b86c275abe26134c656dc1371b02a079e4ebb782a0a0be0d6359060e5'
VECTORS = [
    ('xts-plain64', '11' * 16 + '22' * 16, 0x3333333333, '44' * 32,
     'c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0'),
    ('cbc-essiv:sha256', CS_ESSIV_KEY, 0,
     '6af5fe6db6ce247a6ed030e36d933c6baf9323340d1dad07efb5fcf58fbdb85e',
     'ef4cbb2ebc59f2df3be5865f49cd221f85424915fcc07caf2ada431386aab467'),
    ('cbc-essiv:sha256', CS_ESSIV_KEY, 249,
     '49ab1e9b9a33a1c7e23f9015bc6a15fc782e10f6f4c5c1304878917b54a10dd1',
     '65a93a3fdb8827b2e2b1286bef14e63518451be4a934b46f40cc92d237f54189'),
    ('cbc-essiv:sha256', bytes(range(32)).hex(), (1 << 32) + 1, bytes(range(32)).hex(),
     '217149b7db08894426b8a0577525abe939889443677f14bcfde7b143d0d5f239'),
    ('cbc-plain', bytes(range(16)).hex(), (1 << 32) + 1, bytes(range(32)).hex(),
     'f62214920bf2617625d028e6c46950deed43bb2d290db9dee2f4aedbd1d4b13d'),
    ('cbc-plain64', bytes(range(16)).hex(), (1 << 32) + 1, bytes(range(32)).hex(),
     'b58c24dd33acb57058eb38d8a44056d312540437cc3cb11668bdec42ba751600'),
]


def selftest():
    """The known-answer tests; returns a list of failures (empty if none)."""
    bad = []
    for mode, key, sector, plain, want in VECTORS:
        key, plain, want = bytes.fromhex(key), bytes.fromhex(plain), bytes.fromhex(want)
        c = sector_ciphers('aes', mode, key)(sector)
        e, d = c.encryptor(), c.decryptor()
        got = e.update(plain) + e.finalize()
        back = d.update(want) + d.finalize()
        if got != want or back != plain:
            bad.append('aes-%s sector %#x: encrypts to %s, want %s'
                       % (mode, sector, got.hex(), want.hex()))
    return bad


def main(argv):
    if argv[:1] == ['dump'] and len(argv) == 2:
        print(read_header(argv[1]))
    elif argv[:1] == ['unlock'] and len(argv) == 3:
        with open(argv[2], 'rb') as f:
            slot, key = unlock(argv[1], f.read())
        print(key.hex())
    elif argv == ['selftest']:
        bad = selftest()
        for b in bad:
            print(b)
        sys.exit(1 if bad else 0)
    else:
        sys.exit(__doc__)


if __name__ == '__main__':
    main(sys.argv[1:])
