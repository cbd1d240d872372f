"""What the two independent LUKS readers of the tests, luks1.py and
luks2.py, have in common: the anti-forensic merge with its diffusion, the
PBKDF2 and hash primitives, and the pieces of dm-crypt's sector
encryption (AES in ECB, CBC or XTS mode; the plain, plain64 and essiv IV
numbers; whole sectors in turn).

Written from the LUKS1 On-Disk Format Specification 1.2.3 (section 2.4,
AFsplit/AFmerge and H1) and the LUKS2 one (which keeps LUKS1's AF and
dm-crypt's IVs); like both readers, it shares no code with QEMU or
cryptsetup.  PBKDF2-HMAC and the hashes are hashlib's; AES is Debian's
python3-cryptography, imported when a cipher is first made (luks1.py
reads headers without it).  Each reader keeps its own parsing of cipher
names and its own errors.
"""

import hashlib
import struct


# --- hashes -------------------------------------------------------------------
def digest(hash_name, data):
    """hash_name (a hashlib name: 'sha256', 'sha1', ...) of data."""
    return hashlib.new(hash_name, data).digest()


def digest_size(hash_name):
    return hashlib.new(hash_name).digest_size


def pbkdf2(hash_name, secret, salt, iterations, length):
    """PBKDF2-HMAC with hash_name: length bytes."""
    return hashlib.pbkdf2_hmac(hash_name, secret, salt, iterations, length)


# --- the anti-forensic merge ------------------------------------------------------
def diffuse(block, hash_name):
    """H1 of section 2.4.1: the block cut into digest-sized pieces, piece
    i replaced by hash(i as 32-bit big-endian || piece), the last one
    cropped to its length."""
    size = digest_size(hash_name)
    out = bytearray()
    for i in range(0, len(block), size):
        piece = block[i:i + size]
        out += digest(hash_name, struct.pack('>I', i // size) + piece)[:len(piece)]
    return bytes(out)


def af_merge(material, length, stripes, hash_name):
    """AFmerge: d = 0, d = H(d xor s_k) for the first stripes-1 stripes,
    then D = d xor the last stripe."""
    d = bytes(length)
    for k in range(stripes - 1):
        s = material[k * length:(k + 1) * length]
        d = diffuse(bytes(a ^ b for a, b in zip(d, s)), hash_name)
    last = material[(stripes - 1) * length:stripes * length]
    return bytes(a ^ b for a, b in zip(d, last))


# --- sector encryption --------------------------------------------------------------
def iv_plain(n):
    """plain: the IV number's low 32 bits, little-endian, then zeros."""
    return struct.pack('<I', n & 0xFFFFFFFF) + bytes(12)


def iv_plain64(n):
    """plain64: the IV number in 64 bits, little-endian, then zeros."""
    return struct.pack('<Q', n) + bytes(8)


def aes(key, chain, iv=None):
    """A cryptography Cipher: AES with key in chain mode 'ecb', 'cbc' or
    'xts' (iv: the IV, or XTS's tweak)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    if chain == 'xts':
        mode = modes.XTS(iv)
    elif chain == 'cbc':
        mode = modes.CBC(iv)
    elif chain == 'ecb':
        mode = modes.ECB()
    else:
        raise ValueError('chain mode %r' % chain)
    return Cipher(algorithms.AES(key), mode)


def essiv(hash_name, key):
    """essiv:HASH: a function, IV number -> IV: plain64's IV encrypted
    with AES-ECB under the hash of the key, so that IVs can't be
    predicted."""
    ecb = aes(digest(hash_name, key), 'ecb')

    def iv(n):
        e = ecb.encryptor()
        return e.update(iv_plain64(n)) + e.finalize()
    return iv


def crypt_sectors(cipher_for, data, sector_size, first_iv, iv_step, encrypt):
    """Encrypt or decrypt data, whole sectors of sector_size bytes, one
    after the other: sector i with the Cipher cipher_for(first_iv + i *
    iv_step).  (The caller checks that data is whole sectors.)"""
    out = bytearray()
    for i in range(len(data) // sector_size):
        c = cipher_for(first_iv + i * iv_step)
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(data[i * sector_size:(i + 1) * sector_size]) + op.finalize()
    return bytes(out)
