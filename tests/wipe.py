#!/usr/bin/python3
"""No passphrase and no key outlives its use in QEMU's memory.

A qemu-system-x86_64 (no machine, QMP only) is given secrets from files,
opens a LUKS volume with a detached header through blockdev-add, adds a
keyslot with x-blockdev-amend, then deletes the node and the secrets.
Its memory, every readable mapping of /proc/PID/mem, is then searched for
the passphrases and for the volume key, which an independent
implementation (tests/lib, or cryptsetup for Argon2 without argon2-cffi)
gets from the header.  Freed memory keeps its
bytes unless they are wiped, so what was freed without a wipe is found.
While the volume is open, both must be found (the secret objects hold the
passphrases, the cipher the key): that shows the search sees them.

A volume each of LUKS1, LUKS2 with PBKDF2, and LUKS2 with Argon2id.  The
first 16 bytes of a freed block may be overwritten by the allocator, so
what is searched for is the part of each secret past them: the
passphrases are 64 characters, the keys 32 or 64 bytes.

QEMU_WIPE_QEMU runs another qemu-system-x86_64 (to show the checks red on
a build without the wiping).  Prints TAP.
"""

import os
import re
import secrets
import time

import luks1
import luks2
from proc import (QEMU_IMG, QEMU_SYSTEM, MiB, missing_tools, python_qemu, qemu_img, qmp_ok, run,
                  scratch, write)
from specs import secret
from tap import check, diag, tap

QEMU = os.environ.get('QEMU_WIPE_QEMU') or QEMU_SYSTEM

gone = missing_tools([QEMU_IMG, QEMU])
if gone:
    check(False, 'prerequisites present: missing ' + ', '.join(gone))
    tap.done()
try:
    python_qemu()
    from qemu.machine import QEMUMachine
except ImportError as e:
    check(False, "QEMU's own python library imports from %s" % python_qemu(), str(e))
    tap.done()

d = scratch('wipe.')


def passphrase(name):
    """A random passphrase of 64 characters, in file @name"""
    p = secrets.token_hex(32).encode()
    write(name, p)
    return p


def memory(pid):
    """The readable memory of process @pid, mapping by mapping"""
    with open('/proc/%d/maps' % pid) as maps, open('/proc/%d/mem' % pid, 'rb', 0) as mem:
        for line in maps:
            m = re.match(r'([0-9a-f]+)-([0-9a-f]+) r', line)
            if not m or '[vvar]' in line or '[vsyscall]' in line:
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            try:
                mem.seek(start)
                yield line.split()[-1] if len(line.split()) > 5 else '[anon]', mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue


def find(pid, wanted):
    """{name: [where each of @wanted's byte strings is]}"""
    found = {name: [] for name in wanted}
    for where, data in memory(pid):
        for name, needle in wanted.items():
            n = data.count(needle)
            if n:
                found[name].append('%s (%d)' % (where, n))
    return found


def volume(name, create_opts):
    """A detached header and its payload, made by qemu-img; returns
    (header, payload, passphrase, volume key)"""
    pw = passphrase(name + '.key')
    hdr, payload = name + '.hdr', name + '.raw'
    write(payload, b'')
    r = qemu_img('create', '--object', secret('s', file=name + '.key'), '-f', 'luks',
                 '-o', 'key-secret=s,detached-header=true,' + create_opts, hdr)
    check(r.ok, '%s: qemu-img creates the header' % name, r)
    os.truncate(payload, 4 * MiB)
    if 'argon2' in create_opts and not luks2.have_argon2():
        # cryptsetup, then, for Argon2
        r = run(['cryptsetup', 'luksDump', '--dump-volume-key', '-q',
                 '--key-file', name + '.key', hdr])
        key = bytes.fromhex(''.join(re.findall(r'(?:MK dump:|^)\s+((?:[0-9a-f]{2} )+)',
                                               r.out, re.M)).replace(' ', ''))
        check(len(key) == 64, '%s: cryptsetup gives the volume key' % name, r)
    elif 'version=2' in create_opts:
        _, key = luks2.unlock(luks2.Header(hdr), pw)
    else:
        _, key = luks1.unlock(hdr, pw)
    return hdr, payload, pw, key


def qmp(vm, cmd, **args):
    """One TAP line: cmd succeeds"""
    return qmp_ok(vm, 'QMP %s' % cmd, cmd, **args)


def amend(vm, node, new_secret, extra):
    """Add a keyslot with @new_secret through x-blockdev-amend, waiting for
    its job"""
    opts = {'driver': 'luks', 'state': 'active', 'new-secret': new_secret}
    opts.update(extra)
    qmp(vm, 'x-blockdev-amend', **{'job-id': 'amend0', 'node-name': node, 'options': opts})
    end = time.time() + 120
    while time.time() < end:
        jobs = vm.command('query-jobs')
        job = [j for j in jobs if j['id'] == 'amend0']
        if job and job[0]['status'] == 'concluded':
            check('error' not in job[0], 'the amend job succeeds', job[0])
            vm.command('job-dismiss', id='amend0')
            return
        time.sleep(0.1)
    check(False, 'the amend job concludes')


def case(what, name, create_opts, amend_opts):
    hdr, payload, pw, key = volume(name, create_opts)
    new_pw = passphrase('new.key')
    wanted = {'the passphrase': pw[16:], 'the new passphrase': new_pw[16:],
              'the volume key': key[16:32]}
    vm = QEMUMachine(QEMU, base_temp_dir=d, sock_dir=d, log_dir=d)
    vm.add_args('-machine', 'none', '-nodefaults', '-display', 'none')
    try:
        vm.launch()
        qmp(vm, 'object-add', **{'qom-type': 'secret', 'id': 'sec0',
                                 'file': os.path.abspath(hdr[:-4] + '.key')})
        qmp(vm, 'object-add', **{'qom-type': 'secret', 'id': 'sec1',
                                 'file': os.path.abspath('new.key')})
        qmp(vm, 'blockdev-add', **{'driver': 'luks', 'node-name': 'vol', 'key-secret': 'sec0',
                                   'file': {'driver': 'file', 'filename': payload},
                                   'header': {'driver': 'file', 'filename': hdr}})
        amend(vm, 'vol', 'sec1', amend_opts)
        found = find(vm.get_pid(), wanted)
        check(all(found.values()), '%s, open: the search finds the passphrases (in their '
              'secret objects) and the volume key (in the cipher)' % what, found)
        qmp(vm, 'blockdev-del', **{'node-name': 'vol'})
        qmp(vm, 'object-del', id='sec0')
        qmp(vm, 'object-del', id='sec1')
        found = find(vm.get_pid(), wanted)
        for name, where in found.items():
            check(not where, '%s, after blockdev-del and object-del: %s is nowhere in '
                  "QEMU's memory" % (what, name), 'found in: %s' % ', '.join(where))
    finally:
        vm.shutdown()


case('LUKS1', 'luks1', 'cipher-alg=aes-256,cipher-mode=xts,iter-time=10', {'iter-time': 10})
case('LUKS2 with PBKDF2', 'luks2-pbkdf2', 'version=2,kdf=pbkdf2,kdf-iterations=1000',
     {'iter-time': 10})
case('LUKS2 with Argon2id', 'luks2-argon2id',
     'version=2,kdf=argon2id,kdf-memory=64,kdf-parallel=1,kdf-iterations=4',
     {'__org.example_luks2': {'kdf': 'argon2id', 'kdf-memory': 64,
                              'kdf-parallel': 1, 'kdf-iterations': 4}})
diag('searched: the passphrases past their 16th byte, the volume key from byte 16 to 32')
tap.done()
