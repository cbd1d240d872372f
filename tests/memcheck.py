#!/usr/bin/python3
"""The LUKS paths that fail, run under valgrind's memcheck: a failure
must free what it allocated, as success does.

Each case runs one qemu-img or qemu-io command that QEMU must refuse
(its error text checked), under valgrind with --leak-check=full, and
passes when memcheck finds no definitely lost block and no invalid
access.  "Possibly lost" blocks are not counted: QEMU's RCU and other
threads keep memory alive at exit.  Prints TAP.
"""

import shutil

from proc import QEMU_IMG, QEMU_IO, MiB, missing_tools, run, scratch, write
from specs import secret, spec
from tap import check, tap

VALGRIND = shutil.which('valgrind')
gone = missing_tools([QEMU_IMG, QEMU_IO], commands=['valgrind'])
if gone:
    check(False, 'prerequisites present: missing ' + ', '.join(gone))
    tap.done()
scratch('memcheck.')
write('key', b'passphrase')
write('wrong', b'not it')

MEMCHECK = [VALGRIND, '--leak-check=full', '--errors-for-leak-kinds=definite',
            '--error-exitcode=99', '-q']


def memcheck(desc, args, text):
    """@args must fail, saying @text, and leave memcheck nothing to say"""
    r = run(MEMCHECK + args, timeout=300)
    check(r.rc not in (0, 99) and text in r.out,
          f'{desc}: refused, saying "{text}"', r)
    check(r.rc != 99 and 'definitely lost' not in r.out and
          not any(f'Invalid {what}' in r.out
                  for what in ('read', 'write', 'free')),
          f'{desc}: memcheck finds no leak and no invalid access', r)


def main():
    key = secret('sec0', file='key')
    wrong = secret('sec0', file='wrong')
    memcheck('LUKS2 create over the Argon2 memory limit',
             [QEMU_IMG, 'create', '--object', key, '-f', 'luks', '-o',
              'key-secret=sec0,version=2,kdf=argon2id,kdf-memory=4194304',
              'v2.img', '1M'],
             'would be refused when the volume is opened')
    memcheck('LUKS1 create with an unknown hash',
             [QEMU_IMG, 'create', '--object', key, '-f', 'luks', '-o',
              'key-secret=sec0,hash-alg=nothere', 'v1.img', '1M'],
             'nothere')

    r = run([QEMU_IMG, 'create', '--object', key, '-f', 'luks', '-o',
             'key-secret=sec0,iter-time=10,detached-header=on', 'hdr.img'])
    check(r.ok, 'a detached LUKS1 header to open', r)
    r = run([QEMU_IMG, 'create', '--object', key, '-f', 'luks', '-o',
             'key-secret=sec0,version=2,kdf=pbkdf2,kdf-iterations=1000,'
             'detached-header=on', 'hdr2.img'])
    check(r.ok, 'a detached LUKS2 header to open', r)
    with open('payload.raw', 'wb') as f:
        f.truncate(MiB)
    for name, hdr in (('LUKS1', 'hdr.img'), ('LUKS2', 'hdr2.img')):
        memcheck(f'{name} open with the wrong passphrase',
                 [QEMU_IO, '--object', wrong, '-c', 'read 0 512',
                  spec('payload.raw', hdr)], 'Invalid password')
        memcheck(f'{name} open with the header as payload',
                 [QEMU_IO, '--object', key, '-c', 'read 0 512',
                  spec(hdr, hdr)], 'is given as both the LUKS header')
        memcheck(f'{name} open of a payload that holds a LUKS volume',
                 [QEMU_IO, '--object', key, '-c', 'read 0 512',
                  spec('hdr.img' if name == 'LUKS2' else 'hdr2.img', hdr)],
                 'holds a LUKS volume of its own')
    tap.done()


main()
