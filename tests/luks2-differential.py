#!/usr/bin/python3
"""LUKS2 headers crafted to sit on the edges of what cryptsetup accepts,
judged by cryptsetup and by QEMU (the build under test): do both open
each one, or both refuse it?

A base volume comes from `cryptsetup luksFormat` (PBKDF2 with 1000
iterations, so that every unlock is cheap), attached and with a detached
header.  Each case mutates its JSON metadata (as a dict, or as raw text
where standard JSON can't say it: duplicate keys, single quotes, bytes
that aren't UTF-8, trailing garbage) or its binary header, and writes
both header copies with valid checksums (the sequence id is unchanged).
cryptsetup's verdict is `cryptsetup open --test-passphrase` (it can't map
devices here); QEMU's is qemu-io reading the first sector with the right
passphrase.  A case passes when the two agree.

The cases where they are known to disagree today are listed in
KNOWN_DISAGREEMENTS with QEMU's current verdict: such a case passes while
QEMU still says that and cryptsetup the opposite, so that a change on
either side (QEMU fixed, or broken the other way) turns it red; the
entry then goes.  Prints TAP; each line has the reasons both gave as
"#" lines after it.

Facts of cryptsetup 2.6.1 with json-c 0.16 (Debian 12) that the cases
rest on, from its lib/luks2/luks2_json_metadata.c, luks2_disk_metadata.c
and luks2_keyslot*.c:
  - the JSON is parsed by json_tokener_parse_ex() with json-c's defaults:
    not strict (single quotes, comments, trailing commas, bytes that are
    not UTF-8 and raw control characters pass), duplicate keys allowed
    (the last one wins), and a depth limit of 32: every value counts as
    a level, the top-level object being level 1, so 32 nested objects
    pass only if the innermost is empty, and a scalar must be inside at
    most 31 of them;
  - the area must start with '{', and every byte after the object up to
    the end of the area must be NUL (at least one);
  - offsets and sizes of segments and keyslot areas are strings of
    decimal digits only (isdigit), read with strtoull; config json_size
    and keyslots_size are read with strtoull alone, which allows leading
    white space and a sign;
  - a luks2 keyslot must be bound to exactly one digest; a keyslot of
    another type is not checked;
  - a PBKDF2 kdf with a member too many fails validation, and the repair
    that follows (in memory) deletes that member, after which it passes;
  - unknown members elsewhere are ignored;
  - the ids of keyslots, digests and tokens are checked for digits only:
    "01" is token 1, and keyslot or digest 32 passes (a token of 32 or
    more passes the validation, then trips an assertion when the
    passphrase is checked: cryptsetup aborts, which counts as refusing);
  - af.stripes is checked to be an integer, and 4000 are merged whatever
    it says;
  - --test-passphrase unlocks the volume key and activates nothing, so
    what only an activation checks (mandatory requirements, the segment's
    type, cipher, sector size and integrity) doesn't stop it.
QEMU opens an attached volume whose segment offset is 0 as a header
with no payload (of length 0): it unlocks, but the read of sector 0
fails; that counts as opening, and the failure is shown.
"""

import json
import os
import shutil
import struct
import time

import luks2
from proc import (QEMU_IMG, QEMU_IO, MiB, missing_tools, qemu_img, qemu_io, read, run, scratch,
                  write)
from specs import secret, spec
from tap import check, diag, tap

# Cases on which cryptsetup and QEMU disagree today: case name (or
# "attached: NAME" / "detached: NAME" for one layout only) -> (what QEMU
# does now, 'opens' or 'refuses'; why).  A listed case passes only while
# QEMU does that and cryptsetup the opposite.  A reason that starts with
# "[test-passphrase]" is one where cryptsetup's verdict is that of
# `open --test-passphrase`, which unlocks the volume key and activates
# nothing, so that QEMU's refusal may well be right.
_LAX = "json-c, not strict, takes %s; LUKS2 metadata are standard JSON " \
    "(RFC 8259), which is all that cryptsetup writes, and QEMU parses them so"
_ID = 'cryptsetup takes any key of decimal digits (numbered()), %s; QEMU ' \
    'takes 0 to 31 without leading zeros'
_HASH = "cryptsetup's OpenSSL backend finds a hash by its name in any case; " \
    "QEMU takes the lower-case name only"
_STRTOULL = 'cryptsetup reads config %s with strtoull() alone, which skips ' \
    'white space and takes a sign; QEMU takes decimal digits only'
KNOWN_DISAGREEMENTS = {
    'token number 01': ('refuses', _ID % 'as the number atoi() makes of it'),
    'keyslot number 32, bound to the digest':
        ('refuses', _ID % 'checking not even its own limit of 32 keyslots'),
    'digest number 32':
        ('refuses', _ID % 'checking not even its own limit of 32 digests'),
    'a token string with a lone surrogate escape (\\ud800)':
        ('refuses', "json-c takes an unpaired surrogate escape; QEMU's JSON "
         'parser refuses it'),
    'a token string with a raw control character':
        ('refuses', _LAX % 'raw control characters in strings'),
    'a single-quoted string in a token':
        ('refuses', _LAX % "'single-quoted' strings"),
    'a single-quoted key type in a segment':
        ('refuses', _LAX % "'single-quoted' strings"),
    'a comment in the JSON': ('refuses', _LAX % '/* */ comments'),
    'a trailing comma in an object': ('refuses', _LAX % 'a trailing comma'),
    'a trailing comma in an array': ('refuses', _LAX % 'a trailing comma'),
    'a token value NaN': ('refuses', _LAX % 'NaN'),
    'a token value True (capitalised)':
        ('refuses', _LAX % 'true, false and null in any case'),
    'a token number with a leading zero':
        ('refuses', _LAX % 'numbers with leading zeros'),
    'an unknown member in the PBKDF2 kdf':
        ('refuses', 'cryptsetup fails the validation, repairs the metadata '
         'in memory (LUKS2_hdr_repair deletes the member) and takes them; '
         'QEMU takes type, hash, iterations and salt only'),
    'keyslot af stripes 3999':
        ('refuses', 'cryptsetup 2.6.1 merges 4000 stripes (LUKS_STRIPES) '
         'whatever af.stripes says; QEMU refuses a keyslot of another '
         'number'),
    'keyslot kdf hash SHA256 in capitals': ('refuses', _HASH),
    'keyslot af hash SHA256 in capitals': ('refuses', _HASH),
    'digest hash SHA256 in capitals': ('refuses', _HASH),
    'checksum algorithm SHA256 in capitals': ('refuses', _HASH),
    'config json_size with a leading +': ('refuses', _STRTOULL % 'json_size'),
    'config keyslots_size with leading white space':
        ('refuses', _STRTOULL % 'keyslots_size'),
    'a second segment, linear, after segment 0':
        ('refuses', 'cryptsetup validates segment 1 and activates segment 0 '
         'only; QEMU refuses more than one segment'),
    'an unknown requirement in config.requirements.mandatory':
        ('refuses', '[test-passphrase] cryptsetup checks mandatory '
         "requirements when it activates (LUKS2_activate: \"Unmet LUKS2 "
         'requirements detected"), not to unlock the key'),
    'segment sector_size 8192':
        ('refuses', '[test-passphrase] the segment is for dm-crypt, which '
         'takes sectors of 512 to 4096 bytes; QEMU refuses it up front'),
    'a segment with integrity':
        ('refuses', '[test-passphrase] the segment needs dm-integrity; QEMU '
         'refuses it up front'),
    'a segment of type linear':
        ('refuses', '[test-passphrase] unlocking the key never looks at the '
         "segment's type; QEMU can read a crypt segment only"),
    'segment encryption in capitals':
        ('refuses', '[test-passphrase] unlocking the key never uses the '
         "segment's cipher (the kernel's names are lower case); QEMU parses "
         'it up front'),
}

KEY = b'differential passphrase'
WRONG = b'not the passphrase'
VOLUME_SIZE = 4 * MiB
FORMAT = ['luksFormat', '--type', 'luks2', '--pbkdf', 'pbkdf2',
          '--pbkdf-force-iterations', '1000', '--batch-mode',
          '--key-file', 'key', '--luks2-metadata-size', '16k',
          '--luks2-keyslots-size', '1m', '--cipher', 'aes-xts-plain64',
          '--key-size', '512', '--sector-size', '512']
CRYPTSETUP = shutil.which('cryptsetup', path=os.environ.get('PATH', '') +
                          ':/usr/sbin:/sbin')

gone = missing_tools([QEMU_IMG, QEMU_IO], ['cryptsetup'], ['cryptography'])
if gone:
    check(False, 'prerequisites present: missing ' + ', '.join(gone))
    tap.done()
scratch('luks2-differential.')
write('key', KEY)
write('wrong', WRONG)


# --- the volumes -------------------------------------------------------------
class Layout:
    """A base volume: attached (header and payload in one file) or with a
    detached header (the payload file is shared by every case).  Each
    case writes its header into the file self.case."""

    def __init__(self, name):
        self.name = name
        self.detached = name == 'detached'
        self.payload = f'{name}.img'
        write(self.payload, b'')
        os.truncate(self.payload, VOLUME_SIZE)
        args = [CRYPTSETUP] + FORMAT
        if self.detached:
            args += ['--header', f'{name}.hdr']
        r = run(args + [self.payload])
        self.ok = check(r.ok, f'{name}: cryptsetup luksFormat', r)
        if not self.ok:
            return
        # The bytes of the file that holds the header, and its metadata
        base_file = f'{name}.hdr' if self.detached else self.payload
        self.base = read(base_file)
        self.meta = luks2.Header(base_file).json
        self.hdr_size = struct.unpack_from('>Q', self.base, 8)[0]
        self.case = f'case-{name}.hdr' if self.detached else f'case-{name}.img'

    def case_files(self):
        """(payload, header or None) of the case volume"""
        if self.detached:
            return self.payload, self.case
        return self.case, None

    def header_args(self):
        """The case volume as cryptsetup's arguments"""
        payload, header = self.case_files()
        return (['--header', header] if header else []) + [payload]


def cs_args(layout, keyfile='key'):
    return [CRYPTSETUP, '--debug', 'open', '--test-passphrase', '--key-file',
            keyfile] + layout.header_args()


# --- crafting ----------------------------------------------------------------
class Craft:
    """A header to write: @text is the JSON (padded with NULs to the end
    of the area unless it fills it), @tail bytes put after the first NUL,
    @bin a function that edits each 4096-byte binary header (bytearray,
    secondary) before the checksum; @damaged the copies (False: the
    primary, True: the secondary) whose checksum is then made wrong"""

    def __init__(self, text, tail=b'', bin=None, damaged=()):
        self.text, self.tail, self.bin, self.damaged = text, tail, bin, damaged


def J(meta):
    """Compact JSON text, as cryptsetup writes it"""
    return json.dumps(meta, separators=(',', ':')).encode()


def raw(meta, **subs):
    """The JSON text of @meta with each string "@NAME@" in it replaced by
    the bytes subs[NAME] (raw JSON text)"""
    text = J(meta)
    for name, value in subs.items():
        mark = b'"@' + name.encode() + b'@"'
        assert text.count(mark) == 1, name
        text = text.replace(mark, value)
    return text


def build(layout, craft):
    """The bytes of the header file of @layout with @craft applied"""
    data = bytearray(layout.base)
    size = layout.hdr_size
    area = craft.text
    if craft.tail:
        area += b'\0' + craft.tail
    if len(area) > size - luks2.BIN_SIZE:
        raise ValueError('JSON area overflows: %d bytes' % len(area))
    area += bytes(size - luks2.BIN_SIZE - len(area))
    for off, secondary in ((0, False), (size, True)):
        raw_copy = bytearray(data[off:off + luks2.BIN_SIZE]) + area
        if craft.bin:
            craft.bin(raw_copy, secondary)
        alg = luks2._cstr(raw_copy[72:104]).lower()
        raw_copy[luks2.CSUM_OFFSET:luks2.CSUM_OFFSET + 64] = bytes(64)
        csum = luks2.checksum(bytes(raw_copy), alg)
        raw_copy[luks2.CSUM_OFFSET:luks2.CSUM_OFFSET + len(csum)] = csum
        if secondary in craft.damaged:
            raw_copy[luks2.CSUM_OFFSET] ^= 0xff
        data[off:off + size] = raw_copy
    return bytes(data)


def copy(obj):
    return json.loads(json.dumps(obj))


def second_keyslot(m, offset=None):
    """Keyslot 1: keyslot 0 with its area right after that of keyslot 0
    (or at @offset)"""
    ks = copy(m['keyslots']['0'])
    a0 = m['keyslots']['0']['area']
    ks['area']['offset'] = str(offset if offset is not None else
                               int(a0['offset']) + int(a0['size']))
    m['keyslots']['1'] = ks
    return ks


def token(**members):
    t = {'type': 'x-differential', 'keyslots': []}
    t.update(members)
    return t


def nested(levels, leaf):
    """@levels nested objects {"n": ...}, the innermost holding @leaf as
    "leaf" (None: the innermost is empty)"""
    obj = {} if leaf is None else {'leaf': leaf}
    for _ in range(levels - 1):
        obj = {'n': obj}
    return obj


def depth_token(m, levels, leaf='x'):
    """A token that makes the document @levels deep as json-c counts:
    each value is a level, the top-level object is level 1 and the token
    object level 3; a scalar @leaf is a level of its own"""
    objects = levels - 3 - (0 if leaf is None else 1)
    m['tokens']['0'] = token(data=nested(objects, leaf))
    return m


# --- the cases ---------------------------------------------------------------
# (name, layouts, function) where the function takes a copy of the base
# metadata (a dict) and returns a dict, JSON text (bytes) or a Craft;
# layouts: 'a' attached, 'd' detached, 'ad' both.
CASES = []


def case(name, layouts='a'):
    def register(fn):
        CASES.append((name, layouts, fn))
        return fn
    return register


@case('control: the metadata written again unchanged', 'ad')
def _(m):
    return m


@case('control: the primary copy damaged, the secondary valid', 'ad')
def _(m):
    return Craft(J(m), damaged=(False,))


@case('control: the secondary copy damaged, the primary valid')
def _(m):
    return Craft(J(m), damaged=(True,))


@case('control: both copies damaged', 'ad')
def _(m):
    return Craft(J(m), damaged=(False, True))


# Bindings between keyslots, digests and segments
@case('keyslot 0 bound to no digest', 'ad')
def _(m):
    m['digests']['0']['keyslots'] = []
    return m


@case('a second keyslot, bound to no digest', 'ad')
def _(m):
    second_keyslot(m)
    return m


@case('a second keyslot, bound to the digest')
def _(m):
    second_keyslot(m)
    m['digests']['0']['keyslots'].append('1')
    return m


@case('a keyslot bound to two digests', 'ad')
def _(m):
    d1 = copy(m['digests']['0'])
    d1['segments'] = []
    m['digests']['1'] = d1
    return m


@case('a keyslot bound to two digests, both of segment 0')
def _(m):
    m['digests']['1'] = copy(m['digests']['0'])
    return m


@case('a digest naming a keyslot that does not exist', 'ad')
def _(m):
    m['digests']['0']['keyslots'].append('5')
    return m


@case('a digest naming a segment that does not exist')
def _(m):
    m['digests']['0']['segments'].append('1')
    return m


@case('a segment with no digest', 'ad')
def _(m):
    m['digests']['0']['segments'] = []
    return m


@case('a token naming a keyslot that does not exist')
def _(m):
    m['tokens']['0'] = token(keyslots=['3'])
    return m


@case('a token naming keyslot 0')
def _(m):
    m['tokens']['0'] = token(keyslots=['0'])
    return m


@case('a token without a type')
def _(m):
    m['tokens']['0'] = {'keyslots': []}
    return m


@case('a token whose keyslots hold a number')
def _(m):
    m['tokens']['0'] = token(keyslots=[0])
    return m


@case('token number 31')
def _(m):
    m['tokens']['31'] = token()
    return m


@case('token number 32')
def _(m):
    m['tokens']['32'] = token()
    return m


@case('token number 01')
def _(m):
    m['tokens']['01'] = token()
    return m


@case('token number 100')
def _(m):
    m['tokens']['100'] = token()
    return m


@case('keyslot number 31, bound to the digest')
def _(m):
    m['keyslots']['31'] = m['keyslots'].pop('0')
    m['digests']['0']['keyslots'] = ['31']
    return m


@case('keyslot number 32, bound to the digest')
def _(m):
    m['keyslots']['32'] = m['keyslots'].pop('0')
    m['digests']['0']['keyslots'] = ['32']
    return m


@case('keyslot number 01, bound to the digest')
def _(m):
    m['keyslots']['01'] = m['keyslots'].pop('0')
    m['digests']['0']['keyslots'] = ['01']
    return m


@case('digest number 32')
def _(m):
    m['digests']['32'] = m['digests'].pop('0')
    return m


@case('a token key that is not a number')
def _(m):
    m['tokens']['x'] = token()
    return m


@case('no tokens section')
def _(m):
    del m['tokens']
    return m


@case('no segments')
def _(m):
    m['segments'] = {}
    m['digests']['0']['segments'] = []
    return m


@case('segment 1 and no segment 0')
def _(m):
    m['segments'] = {'1': m['segments']['0']}
    m['digests']['0']['segments'] = ['1']
    return m


# JSON nesting (json-c counts every value as a level, the top-level
# object as level 1; the leaf here is a string, itself a level)
@case('json depth: 31 levels', 'ad')
def _(m):
    return depth_token(m, 31)


@case('json depth: 32 levels', 'ad')
def _(m):
    return depth_token(m, 32)


@case('json depth: 33 levels', 'ad')
def _(m):
    return depth_token(m, 33)


@case('json depth: 100 levels')
def _(m):
    return depth_token(m, 100)


@case('json depth: 32 nested objects, the innermost empty')
def _(m):
    return depth_token(m, 32, leaf=None)


@case('json depth: 33 nested objects, the innermost empty')
def _(m):
    return depth_token(m, 33, leaf=None)


# Strings
@case('a token string with a Latin-1 byte (0xE9)', 'ad')
def _(m):
    m['tokens']['0'] = token(text='@V@')
    return raw(m, V=b'"caf\xe9"')


@case('a token string in UTF-8 (U+00E9)')
def _(m):
    m['tokens']['0'] = token(text='@V@')
    return raw(m, V='"caf\u00e9"'.encode())


@case('a token string with an overlong UTF-8 sequence')
def _(m):
    m['tokens']['0'] = token(text='@V@')
    return raw(m, V=b'"\xc0\xaf"')


@case('a token string with an uppercase \\u escape (\\u00C9)')
def _(m):
    m['tokens']['0'] = token(text='@V@')
    return raw(m, V=b'"\\u00C9"')


@case('a token string with a lone surrogate escape (\\ud800)')
def _(m):
    m['tokens']['0'] = token(text='@V@')
    return raw(m, V=b'"\\ud800"')


@case('a token string with \\u0000')
def _(m):
    m['tokens']['0'] = token(text='@V@')
    return raw(m, V=b'"a\\u0000b"')


@case('a token string with a raw control character')
def _(m):
    m['tokens']['0'] = token(text='@V@')
    return raw(m, V=b'"a\x01b"')


@case('a single-quoted string in a token')
def _(m):
    m['tokens']['0'] = token(text='@V@')
    return raw(m, V=b"'single'")


@case('a single-quoted key type in a segment')
def _(m):
    m['segments']['0']['type'] = '@V@'
    return raw(m, V=b"'crypt'")


# Duplicate keys
@case('a duplicate key in a token', 'ad')
def _(m):
    m['tokens']['0'] = token(k='@V@')
    return raw(m, V=b'"first","k":"second"')


@case('a duplicate key at top level (tokens)')
def _(m):
    m['tokens']['0'] = token(k='first-tokens')
    text = J(m)
    return text.replace(b'"tokens":', b'"tokens":{},"tokens":', 1)


@case('a duplicate key in a keyslot (priority)')
def _(m):
    m['keyslots']['0']['priority'] = '@V@'
    return raw(m, V=b'1,"priority":2')


# Other JSON that isn't standard, or isn't an object
@case('a comment in the JSON')
def _(m):
    return b'{/* comment */' + J(m)[1:]


@case('a trailing comma in an object')
def _(m):
    return J(m)[:-1] + b',}'


@case('a trailing comma in an array')
def _(m):
    m['digests']['0']['keyslots'] = '@V@'
    return raw(m, V=b'["0",]')


@case('a token value NaN')
def _(m):
    m['tokens']['0'] = token(v='@V@')
    return raw(m, V=b'NaN')


@case('a token value True (capitalised)')
def _(m):
    m['tokens']['0'] = token(v='@V@')
    return raw(m, V=b'True')


@case('a token number beyond 64 bits')
def _(m):
    m['tokens']['0'] = token(v='@V@')
    return raw(m, V=b'123456789012345678901234567890')


@case('a token number with a leading zero')
def _(m):
    m['tokens']['0'] = token(v='@V@')
    return raw(m, V=b'0123')


@case('white space before the JSON object')
def _(m):
    return b' ' + J(m)


@case('white space between the JSON object and the NULs')
def _(m):
    return J(m) + b' \n'


@case('trailing garbage after the JSON object, before the NULs', 'ad')
def _(m):
    return J(m) + b'xyz'


@case('a second JSON object after the first')
def _(m):
    return J(m) + b'{}'


@case('garbage after the NUL that ends the JSON', 'ad')
def _(m):
    return Craft(J(m), tail=b'xyz')


@case('the JSON area not NUL-padded: spaces to its end', 'ad')
def _(m):
    text = J(m)
    return Craft(text + b' ' * (int(m['config']['json_size']) - len(text)))


@case('the JSON area not NUL-padded: the object fills it')
def _(m):
    text = J(m)
    return Craft(text[:-1] + b' ' * (int(m['config']['json_size']) - len(text))
                 + b'}')


@case('the JSON a top-level array')
def _(m):
    return b'[' + J(m) + b']'


# Keyslots
@case('an unknown keyslot type, bound to no digest')
def _(m):
    ks = second_keyslot(m)
    ks['type'] = 'x-unknown'
    return m


@case('an unknown keyslot type, bound to the digest')
def _(m):
    ks = second_keyslot(m)
    ks['type'] = 'x-unknown'
    m['digests']['0']['keyslots'].append('1')
    return m


@case('keyslot 0 of an unknown type')
def _(m):
    m['keyslots']['0']['type'] = 'x-unknown'
    return m


@case('keyslot priority 0 (ignore)')
def _(m):
    m['keyslots']['0']['priority'] = 0
    return m


@case('keyslot priority 2 (prefer)')
def _(m):
    m['keyslots']['0']['priority'] = 2
    return m


@case('keyslot priority 3')
def _(m):
    m['keyslots']['0']['priority'] = 3
    return m


@case('keyslot priority -1')
def _(m):
    m['keyslots']['0']['priority'] = -1
    return m


@case('keyslot key_size 64.0')
def _(m):
    m['keyslots']['0']['key_size'] = 64.0
    return m


@case('keyslot key_size -64')
def _(m):
    m['keyslots']['0']['key_size'] = -64
    return m


@case('keyslot key_size "64" (a string)')
def _(m):
    m['keyslots']['0']['key_size'] = '64'
    return m


@case('keyslot key_size 4294967360 (2^32 + 64)')
def _(m):
    m['keyslots']['0']['key_size'] = 2 ** 32 + 64
    return m


@case('keyslot af stripes 3999')
def _(m):
    m['keyslots']['0']['af']['stripes'] = 3999
    return m


@case('keyslot af of type luks2')
def _(m):
    m['keyslots']['0']['af']['type'] = 'luks2'
    return m


@case('keyslot area of type x-unknown')
def _(m):
    m['keyslots']['0']['area']['type'] = 'x-unknown'
    return m


@case('keyslot kdf hash SHA256 in capitals')
def _(m):
    m['keyslots']['0']['kdf']['hash'] = 'SHA256'
    return m


@case('keyslot af hash SHA256 in capitals')
def _(m):
    m['keyslots']['0']['af']['hash'] = 'SHA256'
    return m


@case('digest hash SHA256 in capitals')
def _(m):
    m['digests']['0']['hash'] = 'SHA256'
    return m


@case('keyslot area encryption in capitals')
def _(m):
    m['keyslots']['0']['area']['encryption'] = 'AES-XTS-PLAIN64'
    return m


@case('segment encryption in capitals')
def _(m):
    m['segments']['0']['encryption'] = 'AES-XTS-PLAIN64'
    return m


@case('keyslot kdf salt in base64 without its padding')
def _(m):
    kdf = m['keyslots']['0']['kdf']
    kdf['salt'] = kdf['salt'].rstrip('=')
    return m


@case('keyslot kdf salt in base64 with a newline in it')
def _(m):
    kdf = m['keyslots']['0']['kdf']
    kdf['salt'] = kdf['salt'][:20] + '\n' + kdf['salt'][20:]
    return m


@case('keyslot kdf iterations 0')
def _(m):
    m['keyslots']['0']['kdf']['iterations'] = 0
    return m


@case('keyslot kdf iterations "1000" (a string)')
def _(m):
    m['keyslots']['0']['kdf']['iterations'] = '1000'
    return m


@case('keyslot area key_size 32 (not that of its cipher key)')
def _(m):
    m['keyslots']['0']['area']['key_size'] = 32
    return m


@case('keyslot kdf without salt')
def _(m):
    del m['keyslots']['0']['kdf']['salt']
    return m


@case('an unknown member in the PBKDF2 kdf')
def _(m):
    m['keyslots']['0']['kdf']['time'] = 4
    return m


@case('an unknown kdf type')
def _(m):
    m['keyslots']['0']['kdf']['type'] = 'x-kdf'
    return m


# Numbers that LUKS2 keeps as strings of digits
def area_offset(value):
    def fn(m):
        m['keyslots']['0']['area']['offset'] = value
        return m
    return fn


def area_size(value):
    def fn(m):
        m['keyslots']['0']['area']['size'] = value
        return m
    return fn


def segment_member(key, value):
    def fn(m):
        m['segments']['0'][key] = value
        return m
    return fn


def config_member(key, value):
    def fn(m):
        m['config'][key] = value
        return m
    return fn


for _name, _fn in (
        ('keyslot area offset -32768', area_offset('-32768')),
        ('keyslot area offset +32768', area_offset('+32768')),
        ('keyslot area offset " 32768"', area_offset(' 32768')),
        ('keyslot area offset 32768.0', area_offset('32768.0')),
        ('keyslot area offset 0x8000', area_offset('0x8000')),
        ('keyslot area offset 0X8000', area_offset('0X8000')),
        ('keyslot area offset 032768 (leading zero)', area_offset('032768')),
        ('keyslot area offset 18446744073709551616 (2^64)',
         area_offset('18446744073709551616')),
        ('keyslot area offset 18446744073709551615 (2^64 - 1)',
         area_offset('18446744073709551615')),
        ('keyslot area offset 32768 as a JSON number', area_offset(32768)),
        ('keyslot area offset empty', area_offset('')),
        ('keyslot area size -258048', area_size('-258048')),
        ('keyslot area size 0', area_size('0')),
        ('keyslot area size 18446744073709551615 (2^64 - 1)',
         area_size('18446744073709551615')),
        ('keyslot area size 258048.5', area_size('258048.5')),
        ('segment offset -2097152', segment_member('offset', '-2097152')),
        ('segment offset 2097152.0', segment_member('offset', '2097152.0')),
        ('segment offset 18446744073709551616 (2^64)',
         segment_member('offset', '18446744073709551616')),
        ('segment offset 2097152 as a JSON number',
         segment_member('offset', 2097152)),
        ('segment size 0', segment_member('size', '0')),
        ('segment size 1048576', segment_member('size', '1048576')),
        ('segment size -1048576', segment_member('size', '-1048576')),
        ('segment size 1000 (not whole sectors)',
         segment_member('size', '1000')),
        ('segment size Dynamic', segment_member('size', 'Dynamic')),
        ('segment size 18446744073709551615 (2^64 - 1)',
         segment_member('size', '18446744073709551615')),
        ('segment iv_tweak -1', segment_member('iv_tweak', '-1')),
        ('segment iv_tweak 18446744073709551616 (2^64)',
         segment_member('iv_tweak', '18446744073709551616')),
        ('segment sector_size 1000', segment_member('sector_size', 1000)),
        ('segment sector_size 8192', segment_member('sector_size', 8192)),
        ('segment sector_size 4096.0', segment_member('sector_size', 4096.0)),
        ('segment offset 0 in an attached volume',
         segment_member('offset', '0')),
        ('segment offset 4096, inside the header',
         segment_member('offset', '4096')),
        ('config json_size with a leading +',
         config_member('json_size', '+12288')),
        ('config keyslots_size with leading white space',
         config_member('keyslots_size', ' 1048576')),
        ('config json_size 012288 (leading zero)',
         config_member('json_size', '012288')),
        ('config json_size 28672 (not the area size)',
         config_member('json_size', '28672')),
        ('config json_size as a JSON number',
         config_member('json_size', 12288)),
        ('config keyslots_size 1048577 (not a multiple of 4096)',
         config_member('keyslots_size', '1048577')),
        ('config keyslots_size 4194304, over the payload',
         config_member('keyslots_size', '4194304')),
        ('config flags holding a number', config_member('flags', [1])),
        ('config flags: an unknown flag', config_member('flags', ['x-flag'])),
):
    case(_name)(_fn)


@case('segment offset 4096 in a detached header, below the end of its '
       'keyslots area', 'd')
def _(m):
    m['segments']['0']['offset'] = '4096'
    return m


@case('segment offset 0x0 in a detached header', 'd')
def _(m):
    m['segments']['0']['offset'] = '0x0'
    return m


# Areas
@case('keyslot area overlapping the binary header of the secondary copy', 'ad')
def _(m):
    m['keyslots']['0']['area']['offset'] = '16384'
    return m


@case('keyslot area at offset 0')
def _(m):
    m['keyslots']['0']['area']['offset'] = '0'
    return m


@case('keyslot area past the keyslots area', 'ad')
def _(m):
    m['keyslots']['0']['area']['offset'] = str(32768 + MiB - 4096)
    return m


@case('two keyslot areas overlapping')
def _(m):
    second_keyslot(m, offset=32768 + 4096)
    m['digests']['0']['keyslots'].append('1')
    return m


# Requirements
@case('an unknown requirement in config.requirements.mandatory', 'ad')
def _(m):
    m['config']['requirements'] = {'mandatory': ['x-unknown-requirement']}
    return m


@case('an empty config.requirements.mandatory')
def _(m):
    m['config']['requirements'] = {'mandatory': []}
    return m


@case('config.requirements with only an optional list')
def _(m):
    m['config']['requirements'] = {'optional': ['x-unknown-requirement']}
    return m


@case('requirement online-reencrypt-v2')
def _(m):
    m['config']['requirements'] = {'mandatory': ['online-reencrypt-v2']}
    return m


@case('config.requirements.mandatory holding a number')
def _(m):
    m['config']['requirements'] = {'mandatory': [1]}
    return m


# Unknown members and segment types
@case('unknown members everywhere but the kdf', 'ad')
def _(m):
    m['x-top'] = {'a': [1, 2]}
    m['config']['x-config'] = 'x'
    m['keyslots']['0']['x-keyslot'] = 1
    m['keyslots']['0']['af']['x-af'] = True
    m['keyslots']['0']['area']['x-area'] = None
    m['segments']['0']['x-segment'] = 'x'
    m['digests']['0']['x-digest'] = []
    return m


@case('a segment with integrity')
def _(m):
    m['segments']['0']['integrity'] = {'type': 'hmac(sha256)',
                                       'journal_encryption': 'none',
                                       'journal_integrity': 'none'}
    return m


@case('a second segment, linear, after segment 0')
def _(m):
    seg = m['segments']['0']
    seg['size'] = str(MiB)
    m['segments']['1'] = {'type': 'linear', 'offset': str(3 * MiB),
                          'size': 'dynamic'}
    return m


@case('segment flags holding a number')
def _(m):
    m['segments']['0']['flags'] = [1]
    return m


@case('a segment of type linear')
def _(m):
    m['segments']['0']['type'] = 'linear'
    return m


@case('a digest of type x-digest')
def _(m):
    m['digests']['0']['type'] = 'x-digest'
    return m


@case('a digest whose digest is not base64')
def _(m):
    m['digests']['0']['digest'] = '!!!!'
    return m


# The binary header
def set_field(offset, length, value):
    def edit(b, secondary):
        b[offset:offset + length] = value.ljust(length, b'\0')
    return edit


@case('checksum algorithm SHA256 in capitals', 'ad')
def _(m):
    return Craft(J(m), bin=set_field(72, 32, b'SHA256'))


@case('checksum algorithm sha512')
def _(m):
    return Craft(J(m), bin=set_field(72, 32, b'sha512'))


@case('checksum algorithm sha1')
def _(m):
    return Craft(J(m), bin=set_field(72, 32, b'sha1'))


@case('UUID in uppercase hex', 'ad')
def _(m):
    def edit(b, secondary):
        b[168:208] = bytes(b[168:208]).upper()
    return Craft(J(m), bin=edit)


@case('a label of 48 bytes with no NUL')
def _(m):
    return Craft(J(m), bin=set_field(24, 48, b'L' * 48))


@case('binary header version 3')
def _(m):
    return Craft(J(m), bin=set_field(6, 2, b'\0\3'))


# --- verdicts ----------------------------------------------------------------
def cs_reason(out):
    """Why cryptsetup refused, from its --debug output: what it said
    before it tried to repair the metadata, else its first error, else
    its last message"""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line == '# Repairing JSON metadata.':
            before = lines[i - 1]
            return (before[2:] if not before.startswith('# Checksum:')
                    else 'LUKS2 validation failed, no reason given')
    for line in lines:
        if line.startswith('# ERROR: '):
            return line[2:]
    for line in lines:
        if 'Assertion' in line:
            return line.replace('cryptsetup: ', '', 1)
    plain = [x for x in lines if x.strip() and not x.startswith('# ') and
             not x.startswith('Command failed with code') and
             x != 'No usable token is available.']
    return plain[-1] if plain else '(no message)'


def qemu_reason(out, payload_spec):
    out = out.replace("can't open device " + payload_spec + ': ', '')
    lines = [x for x in out.splitlines() if x.strip()]
    return ' / '.join(lines) if lines else '(no message)'


def qemu_verdict(r):
    """'opens' (the read of sector 0 may still fail: see read_error()),
    'refuses', or None for a crash or the time limit"""
    if r.rc == 0 or (r.refused and "can't open device" not in r.out):
        return 'opens'
    if r.refused:
        return 'refuses'
    return None


def read_error(r):
    """What qemu-io said if it opened the volume but could not read"""
    return None if r.rc == 0 else r.out.strip()


def cs_verdict(r):
    """'opens', 'refuses', 'aborts' (killed by a signal: counted as not
    opening), or None for the time limit"""
    if r.rc == 0:
        return 'opens'
    if r.refused:
        return 'refuses'
    return 'aborts' if r.rc is not None else None


def judge(layout, keyfile='key'):
    """(cryptsetup's result, QEMU's result) on the case volume"""
    cs = run(cs_args(layout, keyfile), timeout=30)
    payload, header = layout.case_files()
    q = qemu_io('--object', secret('sec0', file=keyfile), '-c', 'read 0 512',
                spec(payload, header, 'sec0'), timeout=30)
    return cs, q


def report(layout, name, cs, q):
    """One TAP line for a case, and the reasons as diagnostics"""
    desc = f'{layout.name}: {name}'
    payload, header = layout.case_files()
    qv, cv = qemu_verdict(q), cs_verdict(cs)
    if qv is None or cv is None:
        check(False, f'{desc}: %s' % ('QEMU crashed or hung' if qv is None
                                      else 'cryptsetup hung'), f'{q}\n{cs}')
        return
    # A cryptsetup that aborts doesn't open the volume
    cv_open = 'opens' if cv == 'opens' else 'refuses'
    how = ' (cryptsetup by aborting, exit status %d)' % cs.rc \
        if cv == 'aborts' else ''
    listed = KNOWN_DISAGREEMENTS.get(desc) or KNOWN_DISAGREEMENTS.get(name)
    if listed:
        want_q, reason = listed
        ok = qv == want_q and cv_open != qv
        if ok:
            line = (f'{desc}: QEMU {qv} while cryptsetup {cv} '
                    f'(listed: {reason})')
        elif qv == cv_open:
            line = (f'{desc}: both {qv[:-1]}{how} now, but '
                    f'KNOWN_DISAGREEMENTS lists it ({reason}): take it off '
                    f'the list')
        else:
            line = (f'{desc}: QEMU {qv} while cryptsetup {cv}; '
                    f'KNOWN_DISAGREEMENTS says QEMU {want_q}')
        check(ok, line)
    elif qv == cv_open:
        check(True, f'{desc}: both {qv[:-1]}{how}')
    else:
        check(False, f'{desc}: QEMU {qv} while cryptsetup {cv}')
    if qv == 'refuses':
        diag('QEMU: ' + qemu_reason(q.out, spec(payload, header, 'sec0')))
    elif read_error(q):
        diag('QEMU opens it, but the read of sector 0 fails: ' +
             read_error(q))
    if cv != 'opens':
        diag('cryptsetup: ' + cs_reason(cs.out))


def run_case(layout, name, fn):
    got = fn(copy(layout.meta))
    if isinstance(got, dict):
        got = Craft(J(got))
    elif isinstance(got, bytes):
        got = Craft(got)
    # An attached case file holds the payload after the header
    write(layout.case, build(layout, got))
    cs, q = judge(layout)
    report(layout, name, cs, q)
    return cs, q


def luks2_info(layout):
    """QEMU's LUKS2 information on the case volume (qemu-img info), or
    None"""
    payload, header = layout.case_files()
    r = qemu_img('info', '--output=json', spec(payload, header, key=None))
    if not r.ok:
        return None
    data = json.loads(r.out)['format-specific']['data']
    return next((v for k, v in data.items() if k.endswith('luks2')), None)


def duplicates(layout, name, cs, q):
    """Which value of a duplicate key cryptsetup keeps (as diagnostics),
    and, where QEMU opens the volume, that QEMU keeps the same"""
    if not cs.ok:
        return
    if 'token' in name:
        e = run([CRYPTSETUP, 'token', 'export', '--token-id', '0'] +
                layout.header_args())
        diag('cryptsetup token export --token-id 0: ' +
             (e.out.strip() if e.ok else 'no token 0'))
    if 'priority' in name:
        d = run([CRYPTSETUP, 'luksDump'] + layout.header_args())
        dumped = [x.strip() for x in d.out.splitlines() if 'Priority' in x]
        diag('cryptsetup luksDump: ' + '; '.join(dumped))
        if qemu_verdict(q) == 'opens':
            info = luks2_info(layout) or {}
            got = [ks.get('priority') for ks in info.get('keyslots', [])]
            check(got == ['prefer'], f'{layout.name}: {name}: QEMU keeps the '
                  f'last value, as cryptsetup does (priority 2, "prefer")',
                  f'QEMU: {got}; cryptsetup: {dumped}')


# --- cryptsetup's own writes: token import -----------------------------------
def imported(layout, name, token_text):
    """A token that `cryptsetup token import` writes itself: a TAP line
    for what the import did, then the case if it took the token"""
    write(layout.case, layout.base)
    write('token.json', token_text)
    r = run([CRYPTSETUP, 'token', 'import', '--json-file', 'token.json',
             '--token-id', '0'] + layout.header_args())
    if not r.ok:
        # A fact about cryptsetup; the crafted case stands for it
        check(r.refused, f'{layout.name}: {name}: cryptsetup token import '
              f'refuses it (exit status {r.rc})', r)
        return
    check(True, f'{layout.name}: {name}: cryptsetup token import takes it')
    area = read(layout.case)[luks2.BIN_SIZE:layout.hdr_size]
    text = area.split(b'\0', 1)[0]
    start = text.find(b'"tokens"')
    end = text.find(b'}}', start)
    diag('the tokens as cryptsetup wrote them: %r' % text[start:end + 2])
    cs, q = judge(layout)
    report(layout, name, cs, q)


IMPORTS = {
    'a token imported by cryptsetup with a Latin-1 byte':
        b'{"type":"x-differential","keyslots":[],"text":"caf\xe9"}',
    'a token imported by cryptsetup with a duplicate key':
        b'{"type":"x-differential","keyslots":[],"k":"first","k":"second"}',
}


def main():
    start = time.time()
    layouts = [lay for lay in (Layout('attached'), Layout('detached'))
               if lay.ok]
    for lay in layouts:
        # The judges themselves: the base opens, a wrong passphrase doesn't
        write(lay.case, lay.base)
        cs, q = judge(lay)
        check(cs.ok and q.ok, f'{lay.name}: the base volume opens with both',
              f'{cs}\n{q}')
        cs, q = judge(lay, 'wrong')
        check(cs.refused and q.refused, f'{lay.name}: a wrong passphrase is '
              f'refused by both', f'{cs}\n{q}')

    names = [name for name, _, _ in CASES] + list(IMPORTS)
    dup = [n for n in names if names.count(n) > 1]
    check(not dup, 'the cases have names of their own', dup)
    for name, where, fn in CASES:
        for lay in layouts:
            if lay.name[0] in where:
                cs, q = run_case(lay, name, fn)
                if 'duplicate key' in name:
                    duplicates(lay, name, cs, q)
    for lay in layouts:
        for name, text in IMPORTS.items():
            imported(lay, name, text)

    stale = [k for k in KNOWN_DISAGREEMENTS
             if k not in names and k.split(': ', 1)[-1] not in names]
    check(not stale, 'KNOWN_DISAGREEMENTS names cases of this suite only',
          'not cases: %s' % stale)
    diag('%d cases in %.1f s' % (len(names), time.time() - start))
    tap.done()


main()
