#!/usr/bin/python3
"""Concurrent I/O through the luks driver, checked byte by byte by an
independent decryption.

qemu-io keeps a queue of aio requests in flight (16, as a guest's virtio
queue would), at random offsets and of random lengths: unaligned ones that
the block layer completes with read-modify-write, small ones that the
driver encrypts in its coroutine, and large ones that it hands to worker
threads in chunks, several at a time.  The requests in flight at once
never overlap, but they may share a sector.  Reads check what the model
says the range holds; after each batch an aio_flush waits for all.

When the I/O has settled, tests/lib/luks1.py unlocks the header by itself
and decrypts the whole payload, which must equal the model: every byte is
what was written last, so no request corrupted another.  Attached and
detached volumes, AES-XTS and AES-CBC-ESSIV.  Then a LUKS2 volume that
cryptsetup made, detached, with 4096-byte sectors (every unaligned request
is a read-modify-write of whole sectors), checked the same way by
tests/lib/luks2.py, and by cryptsetup's own decryption.

The workload is random but repeatable: STRESS_SEED=N in the environment
picks it (the seed is printed).  Prints TAP.
"""

import os
import random
import shutil

import luks1
import luks2
from proc import QEMU_IMG, QEMU_IO, MiB, missing_tools, qemu_img, run, scratch
from specs import secret, spec
from tap import check, diag, tap

SIZE = 24 * MiB
DEPTH = 16
BATCHES = 150
PASSPHRASE = 'stress passphrase'
KiB = 1024


def random_length(rng):
    """Mostly small and unaligned, some medium, some over the 1 MiB
    chunk size of the driver"""
    kind = rng.random()
    if kind < 0.4:
        return rng.randint(1, 4 * KiB)
    if kind < 0.8:
        return rng.randint(4 * KiB, 256 * KiB)
    return rng.randint(256 * KiB, 3 * MiB)


def uniform_run(model, offset, length):
    """How many bytes from offset hold the byte at offset, up to length"""
    value = model[offset]
    end = offset + 1
    limit = offset + length
    while end < limit and model[end] == value:
        end += 1
    return end - offset


def workload(rng, model):
    """qemu-io commands of the batches, with the model updated as they
    run; and the number of requests"""
    cmds = []
    requests = 0
    for _ in range(BATCHES):
        taken = []
        writes = []
        while len(taken) < DEPTH:
            length = min(random_length(rng), SIZE)
            offset = rng.randrange(0, SIZE - length + 1)
            if any(offset < end and start < offset + length
                   for start, end in taken):
                continue
            if rng.random() < 0.7:
                value = rng.randint(1, 255)
                cmds.append('aio_write -q -P 0x%02x %d %d' % (value, offset, length))
                writes.append((offset, length, value))
            else:
                length = uniform_run(model, offset, length)
                cmds.append('aio_read -q -P 0x%02x %d %d'
                            % (model[offset], offset, length))
            taken.append((offset, offset + length))
            requests += 1
        cmds.append('aio_flush')
        # The requests of a batch don't overlap: their order in it doesn't
        # matter to the model
        for offset, length, value in writes:
            model[offset:offset + length] = bytes([value]) * length
    return cmds, requests


def luks1_decrypt(header, data):
    """The independent LUKS1 decryption of payload bytes: (keyslot, plaintext)"""
    slot, master = luks1.unlock(header, PASSPHRASE.encode())
    hdr = luks1.read_header(header)
    return slot, luks1.crypt(False, hdr.cipher_name, hdr.cipher_mode, master, data)


def luks2_decrypt(header, data):
    """The independent LUKS2 decryption of payload bytes: (keyslot, plaintext)"""
    hdr = luks2.Header(header)
    slot, key = luks2.unlock(hdr, PASSPHRASE.encode())
    return slot, luks2.payload_crypt(hdr, key, data, 0, False)


def stress(name, header, payload, payload_offset, volume, rng, decrypt=luks1_decrypt):
    """Run the workload on volume and check the payload independently"""
    model = bytearray(SIZE)
    key = secret(data=PASSPHRASE)
    # A known start: the whole volume written with zeros through QEMU
    r = run([QEMU_IO, '--object', key, '-c', 'write -q -P 0 0 %d' % SIZE, volume])
    if not check(r.ok, '%s: the volume is filled with zeros first' % name, r):
        return
    cmds, requests = workload(rng, model)
    r = run([QEMU_IO, '--object', key, volume],
            stdin=('\n'.join(cmds) + '\nquit\n').encode(), timeout=600)
    bad = [line for line in r.out.splitlines()
           if 'verification failed' in line or 'failed' in line.lower()
           or 'error' in line.lower()]
    check(r.ok and not bad,
          '%s: %d requests, %d at a time in %d batches: no request failed, every '
          'read saw what the model holds' % (name, requests, DEPTH, BATCHES),
          '\n'.join(bad[:20]) or str(r))

    # The independent opinion: unlock the header and decrypt the payload
    with open(payload, 'rb') as f:
        f.seek(payload_offset)
        data = f.read(SIZE)
    slot, plain = decrypt(header, data)
    diff = next((i for i in range(SIZE) if plain[i] != model[i]), None)
    check(diff is None,
          '%s: the independent decryption of the payload (slot %d) matches the model '
          'byte for byte' % (name, slot),
          'first difference at byte %s: %s expected, %s found'
          % (diff, model[diff] if diff is not None else '',
             plain[diff] if diff is not None else ''))
    return model


def main():
    missing = missing_tools(paths=(QEMU_IMG, QEMU_IO), commands=('cryptsetup',),
                            modules=('cryptography',))
    if missing:
        check(False, 'prerequisites present: missing ' + ', '.join(missing))
        tap.done()
    seed = int(os.environ.get('STRESS_SEED', random.randrange(1 << 32)))
    diag('STRESS_SEED=%d' % seed)
    rng = random.Random(seed)
    scratch('stress.')
    key = secret(data=PASSPHRASE)

    for cipher, opts in (('aes-xts-plain64', 'cipher-alg=aes-256,cipher-mode=xts'),
                         ('aes-cbc-essiv', 'cipher-alg=aes-256,cipher-mode=cbc,'
                          'ivgen-alg=essiv,ivgen-hash-alg=sha256')):
        # Attached: the payload follows the header in the same file
        image = 'attached-%s.luks' % cipher
        r = qemu_img('create', '--object', key, '-f', 'luks', '-o',
                     'key-secret=sec0,iter-time=10,' + opts, image, str(SIZE))
        if check(r.ok, 'attached %s volume created' % cipher, r):
            offset = luks1.read_header(image).payload_offset * luks1.SECTOR
            stress('attached ' + cipher, image, image, offset,
                   spec(image), rng)

        # Detached: a header file and a payload file
        header, payload = 'header-%s.img' % cipher, 'payload-%s.raw' % cipher
        r = qemu_img('create', '--object', key, '-f', 'luks', '-o',
                     'key-secret=sec0,iter-time=10,detached-header=true,' + opts,
                     header)
        with open(payload, 'wb') as f:
            f.truncate(SIZE)
        if check(r.ok, 'detached %s header created' % cipher, r):
            stress('detached ' + cipher, header, payload, 0,
                   spec(payload, header), rng)

    # LUKS2, made by cryptsetup: 4096-byte sectors, a detached header
    header, payload = 'header-luks2.img', 'payload-luks2.raw'
    with open(payload, 'wb') as f:
        f.truncate(SIZE)
    r = run(['cryptsetup', '--batch-mode', 'luksFormat', '--type', 'luks2', '--pbkdf', 'pbkdf2',
             '--pbkdf-force-iterations', '1000', '--cipher', 'aes-xts-plain64', '--key-size',
             '512', '--sector-size', '4096', '--key-file', '-', '--header', header, payload],
            stdin=PASSPHRASE.encode())
    seg = luks2.Header(header).segment() if r.ok else {}
    if check(r.ok and seg['sector_size'] == 4096 and seg['offset'] == '0',
             'detached LUKS2 header created by cryptsetup (aes-xts-plain64, 4096-byte sectors)',
             '%s\nsegment: %s' % (r, seg)):
        model = stress('detached LUKS2 4096-byte sectors', header, payload, 0,
                       spec(payload, header), rng, luks2_decrypt)
        if model:
            # And cryptsetup's own opinion: it decrypts (a copy of) the
            # payload in place, in user space
            shutil.copy(header, 'cs-' + header)
            shutil.copy(payload, 'cs-' + payload)
            r = run(['cryptsetup', '--batch-mode', 'reencrypt', '--decrypt',
                     '--force-offline-reencrypt', '--header', 'cs-' + header, 'cs-' + payload,
                     '--key-file', '-'], stdin=PASSPHRASE.encode(), timeout=120)
            with open('cs-' + payload, 'rb') as f:
                same = r.ok and f.read() == model
            check(same, 'detached LUKS2 4096-byte sectors: cryptsetup reencrypt --decrypt (its '
                  'own decryption) of the payload matches the model too', r)
    tap.done()


main()
