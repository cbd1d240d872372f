#!/usr/bin/python3
"""What opening a hostile LUKS2 header may cost QEMU: the JSON metadata
of a copy are parsed within a budget of 64 Ki tokens, 4 Ki objects and
arrays and 32 levels, about 32 MiB for a copy whatever its JSON area
asks for (crypto/block-luks2.c, luks2_json_limits).

The headers are the largest LUKS2 allows, 4 MiB copies made by
cryptsetup, with the JSON area rewritten and both checksums fixed:

- a JSON bomb, 600,000 empty objects in a token, written with
  'single-quoted' keys that hide the structure from a scanner that
  only knows double quotes, and once with standard quotes: refused at
  once, at little memory;
- the worst header that is still accepted, at every limit at once: it
  must open, at a peak memory (maxrss of qemu-img info) within the
  stated bound of the same command on the plain header.

Prints TAP.
"""

import json
import os
import re
import shutil
import time

import luks2
from proc import QEMU_IMG, MiB, missing_tools, run, scratch, write
from tap import check, diag, tap

HDR_SIZE = 4 * MiB
BOUND = 2 * 32 * MiB      # both copies are parsed and held at once
MAX_TOKENS, MAX_CONTAINERS, MAX_DEPTH = 64 * 1024, 4 * 1024, 32
CRYPTSETUP = shutil.which('cryptsetup', path=os.environ.get('PATH', '') +
                          ':/usr/sbin:/sbin')

gone = missing_tools([QEMU_IMG], ['cryptsetup'], ['cryptography'])
if gone:
    check(False, 'prerequisites present: missing ' + ', '.join(gone))
    tap.done()
scratch('luks2-bounds.')
write('key', b'bounds passphrase')


TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?'
                   rb'|true|false|null|[{}\[\]:,]')
CONTAINER = re.compile(rb'[{\[]')


def count(text, what):
    """How many tokens or containers the JSON text @text has (its strings
    hold no brackets)"""
    return len(what.findall(text))


def make_base():
    with open('base.img', 'wb') as f:
        f.truncate(16 * MiB)
    r = run([CRYPTSETUP, 'luksFormat', '--type', 'luks2', '--batch-mode',
             '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000',
             '--luks2-metadata-size', '4096k', '--luks2-keyslots-size', '1m',
             '--key-file', 'key', 'base.img'])
    check(r.ok, 'cryptsetup formats a volume with 4 MiB header copies', r)
    return r.ok


def with_area(name, text):
    """base.img with @text as the JSON area of both copies"""
    with open('base.img', 'rb') as f:
        data = bytearray(f.read())
    assert len(text) < HDR_SIZE - luks2.BIN_SIZE, len(text)
    area = text + bytes(HDR_SIZE - luks2.BIN_SIZE - len(text))
    for off in (0, HDR_SIZE):
        raw = bytearray(data[off:off + luks2.BIN_SIZE]) + area
        alg = luks2._cstr(raw[72:104]).lower()
        raw[luks2.CSUM_OFFSET:luks2.CSUM_OFFSET + 64] = bytes(64)
        csum = luks2.checksum(raw, alg)
        raw[luks2.CSUM_OFFSET:luks2.CSUM_OFFSET + len(csum)] = csum
        data[off:off + HDR_SIZE] = raw
    write(name, bytes(data))


def info(path):
    """qemu-img info of @path: (exit status, output, seconds)"""
    start = time.time()
    r = run([QEMU_IMG, 'info', path], timeout=60)
    return r.rc, r.out, time.time() - start


def maxrss(path):
    """Peak resident memory, in bytes, of qemu-img info on @path"""
    r = run(['/usr/bin/env', 'python3', '-c',
             'import resource, subprocess, sys; '
             'p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, '
             'stderr=subprocess.DEVNULL); '
             'print(p.returncode, resource.getrusage('
             'resource.RUSAGE_CHILDREN).ru_maxrss * 1024)',
             QEMU_IMG, 'info', path], timeout=120)
    rc, rss = r.out.split()
    return int(rc), int(rss)


def main():
    if not make_base():
        tap.done()
    meta = luks2.Header('base.img').json
    base_text = json.dumps(meta, separators=(',', ':')).encode()
    rc, base_rss = maxrss('base.img')
    check(rc == 0, 'qemu-img info opens the plain header', rc)
    diag('peak memory of qemu-img info on the plain header: %.1f MiB'
         % (base_rss / MiB))

    # The bomb: 600,000 empty objects under a single-quoted key that
    # holds a double quote
    n = 600 * 1000      # under the 2 Mi tokens of QEMU's fixed limit
    bomb = json.loads(base_text)
    bomb['tokens']['0'] = {'type': 'x-bomb', 'keyslots': [], 'b': '@B@'}
    for quote, desc in ((b"'", 'single-quoted'), (b'"', 'double-quoted')):
        key = quote + (b'k"' if quote == b"'" else b'k') + quote
        text = json.dumps(bomb, separators=(',', ':')).encode().replace(
            b'"@B@"', b'{' + key + b':[' + b','.join([b'{}'] * n) + b']}')
        with_area('bomb.img', text)
        rc, out, secs = info('bomb.img')
        check(rc == 1 and 'JSON metadata are not a valid JSON object' in out,
              f'a {desc} JSON bomb is refused', out)
        check(secs < 10, f'a {desc} JSON bomb is refused within 10 s '
              f'({secs:.1f} s)')
        rc, rss = maxrss('bomb.img')
        check(rss - base_rss < BOUND, f'a {desc} JSON bomb costs less than '
              f'{BOUND // MiB} MiB more than the plain header '
              f'({(rss - base_rss) / MiB:.1f} MiB)')

    # The worst accepted header: every limit reached at once
    worst = json.loads(base_text)
    worst['tokens']['0'] = {'type': 'x-worst', 'keyslots': [], 'd': '@D@',
                            'c': '@C@', 's': '@S@'}
    text = json.dumps(worst, separators=(',', ':')).encode()
    # tokens (level 2), the token (3), its member 'd' (4): 28 arrays more
    # put the number 1 at level 32
    deep = b'[' * (MAX_DEPTH - 4) + b'1' + b']' * (MAX_DEPTH - 4)
    text = text.replace(b'"@D@"', deep)
    n_empties = MAX_CONTAINERS - count(text, CONTAINER) - 2
    text = text.replace(b'"@C@"', b'[' + b','.join([b'{}'] * n_empties) +
                        b']')
    # Each string a token, and each comma but the last; an empty array
    # is two tokens
    n_strings = (MAX_TOKENS - count(text, TOKEN)) // 2
    strings = b','.join([b'"' + b'x' * 40 + b'"'] * n_strings)
    text = text.replace(b'"@S@"', b'[' + strings + b']')
    diag('worst header: %d bytes of JSON, %d tokens, %d objects and arrays'
         % (len(text), count(text, TOKEN), count(text, CONTAINER)))
    with_area('worst.img', text)
    rc, out, secs = info('worst.img')
    check(rc == 0, 'the worst header within the limits opens', out)
    rc, rss = maxrss('worst.img')
    check(rc == 0 and rss - base_rss < BOUND, 'the worst header costs less '
          f'than {BOUND // MiB} MiB more than the plain header '
          f'({(rss - base_rss) / MiB:.1f} MiB)')

    # One token and one container over the limits
    for desc, more, why in (
            ('a token', b',"' + b'x' * 40 + b'"', 'more than 65536 tokens'),
            ('an array', b',[]', 'more than 4096 objects and arrays')):
        over = text.replace(b'"]}', b'"' + more + b']}', 1)
        with_area('over.img', over)
        rc, out, secs = info('over.img')
        check(rc == 1 and why in out, f'{desc} more than the worst header '
              f'is refused, saying "{why}"', out)
    tap.done()


main()
