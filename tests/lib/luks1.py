#!/usr/bin/python3
"""Independent LUKS1 helpers for tests/cryptsetup-interop.sh.

Nothing here comes from QEMU or cryptsetup: the payload cipher is AES from
Debian's python3-cryptography (run it with /usr/bin/python3), the IVs are
built here from their definition, and the header fields are edited at the
offsets of the LUKS1 on-disk format specification.

  luks1.py mkhex                       hex volume key from `cryptsetup
                                       luksDump --dump-volume-key` on stdin
  luks1.py encrypt MODE KEYHEX PLAIN PAYLOAD OFFSET
                                       encrypt the file PLAIN (whole 512-byte
                                       sectors) into PAYLOAD at byte OFFSET,
                                       payload sector numbers counted from
                                       OFFSET, as dm-crypt and QEMU do
  luks1.py decrypt MODE KEYHEX PAYLOAD OFFSET LENGTH OUT
                                       the reverse, into the file OUT
  luks1.py selftest                    check the XTS-plain64 path against
                                       IEEE 1619 XTS-AES-128 vector 2
  luks1.py set FILE FIELD VALUE        edit one header field in place
  luks1.py get FILE FIELD              print one header field

MODE is a LUKS1 cipher mode string: xts-plain64, cbc-plain64, cbc-plain or
cbc-essiv:sha256 (the cipher is always AES; its key size follows KEYHEX).

FIELD is one of magic (text, \\x escapes allowed), version, payload-offset,
key-bytes, mk-iterations, or slotN.active, slotN.iterations,
slotN.key-offset, slotN.stripes (N = 0..7).
"""

import hashlib
import re
import struct
import sys

SECTOR = 512

# LUKS1 phdr: offsets of the big-endian fields we touch.
FIELDS = {
    "magic": (0, "6s"),
    "version": (6, ">H"),
    "payload-offset": (104, ">I"),
    "key-bytes": (108, ">I"),
    "mk-iterations": (164, ">I"),
}
SLOT_BASE, SLOT_SIZE = 208, 48
SLOT_FIELDS = {
    "active": (0, ">I"),
    "iterations": (4, ">I"),
    "key-offset": (40, ">I"),
    "stripes": (44, ">I"),
}


def field(name):
    m = re.fullmatch(r"slot([0-7])\.(.+)", name)
    if m:
        off, fmt = SLOT_FIELDS[m.group(2)]
        return SLOT_BASE + SLOT_SIZE * int(m.group(1)) + off, fmt
    return FIELDS[name]


def cipher_for(mode, key):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if mode == "xts-plain64":
        def make(sector):
            tweak = struct.pack("<Q", sector) + bytes(8)
            return Cipher(algorithms.AES(key), modes.XTS(tweak))
        return make
    if mode in ("cbc-plain64", "cbc-plain"):
        def make(sector):
            if mode == "cbc-plain":
                sector &= 0xFFFFFFFF
            iv = struct.pack("<Q", sector) + bytes(8)
            return Cipher(algorithms.AES(key), modes.CBC(iv))
        return make
    if mode == "cbc-essiv:sha256":
        salt = hashlib.sha256(key).digest()
        ecb = Cipher(algorithms.AES(salt), modes.ECB())

        def make(sector):
            e = ecb.encryptor()
            iv = e.update(struct.pack("<Q", sector) + bytes(8)) + e.finalize()
            return Cipher(algorithms.AES(key), modes.CBC(iv))
        return make
    sys.exit("luks1.py: unsupported mode " + mode)


def crypt(encrypt, mode, keyhex, data):
    make = cipher_for(mode, bytes.fromhex(keyhex))
    if len(data) % SECTOR:
        sys.exit("luks1.py: data is not a whole number of sectors")
    out = bytearray()
    for i in range(len(data) // SECTOR):
        c = make(i)
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(data[i * SECTOR:(i + 1) * SECTOR]) + op.finalize()
    return bytes(out)


def main(argv):
    if not argv:
        sys.exit(__doc__)
    cmd = argv[0]
    if cmd == "mkhex":
        text = sys.stdin.read()
        m = re.search(r"MK dump:(.*?)(?:\n\S|\Z)", text, re.S)
        if not m:
            sys.exit("luks1.py: no 'MK dump:' in the input")
        print("".join(re.findall(r"\b[0-9a-f]{2}\b", m.group(1))))
    elif cmd == "selftest":
        # IEEE Std 1619-2007, XTS-AES-128 vector 2: data unit 0x3333333333
        key = bytes([0x11] * 16 + [0x22] * 16)
        c = cipher_for("xts-plain64", key)(0x3333333333).encryptor()
        got = (c.update(bytes([0x44] * 32)) + c.finalize()).hex()
        want = ("c454185e6a16936e39334038acef838b"
                "fb186fff7480adc4289382ecd6d394f0")
        if got != want:
            sys.exit("luks1.py: XTS self-test failed: " + got)
    elif cmd == "encrypt":
        mode, keyhex, plain, payload, offset = argv[1:6]
        with open(plain, "rb") as f:
            data = crypt(True, mode, keyhex, f.read())
        with open(payload, "r+b") as f:
            f.seek(int(offset))
            f.write(data)
    elif cmd == "decrypt":
        mode, keyhex, payload, offset, length, out = argv[1:7]
        with open(payload, "rb") as f:
            f.seek(int(offset))
            data = f.read(int(length))
        if len(data) != int(length):
            sys.exit("luks1.py: payload too short")
        with open(out, "wb") as f:
            f.write(crypt(False, mode, keyhex, data))
    elif cmd in ("set", "get"):
        path, name = argv[1:3]
        off, fmt = field(name)
        with open(path, "r+b" if cmd == "set" else "rb") as f:
            if cmd == "get":
                f.seek(off)
                v = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
                print(v.decode("latin-1") if isinstance(v, bytes) else v)
                return
            value = argv[3]
            if fmt == "6s":
                raw = value.encode("latin-1").decode("unicode_escape")
                packed = raw.encode("latin-1")
            else:
                packed = struct.pack(fmt, int(value, 0))
            f.seek(off)
            f.write(packed)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
