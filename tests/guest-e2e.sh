#!/bin/bash
# End to end in a real guest (issue 4): a tiny Linux guest (built and cached
# by tests/guest/build-guest.sh) under TCG reads and writes LUKS volumes with
# a detached header, set up as the seed does it:
#   1. the seed's VM command line (-object secret, five -blockdev, -device);
#   2. the seed's hotplug, step by step over QMP, and the seed's wrong
#      secret id failing cleanly;
#   3. unplug: device_del, blockdev-del, object-del, files unlocked;
#   4. the header served read-only over NBD by qemu-storage-daemon, and
#      what happens when that server is absent;
#   5. an ordinary attached LUKS volume, unchanged;
#   6. the seed's hotplug through real libvirt (a private, unprivileged
#      session daemon) with `virsh qemu-monitor-command`.
# Prints TAP.  Every wait has a timeout (each test has a deadline too: a
# minute per guest test, three for libvirt); leftovers are killed on exit.
# Arguments pick tests: cmdline hotplug_unplug nbd_header attached libvirt.
# Runs as root (the libvirt test switches to the user nobody with setpriv).
# Needs cpio (guest build), libvirt-daemon, libvirt-daemon-driver-qemu and
# libvirt-clients.  The driver is the Python program at the end of this
# file (Debian's /usr/bin/python3, standard library only).
set -uo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
. "$TOP/scripts/lib.sh"

TMP=$(mktemp -d /tmp/guest-e2e.XXXXXX)
chmod 755 "$TMP"     # the libvirt test runs its daemon as an unprivileged user
# Kill what the driver started (it records each pid in $TMP/pids) if it
# could not do so itself, then remove the temporary files.
cleanup() {
    local pid
    if [ -f "$TMP/pids" ]; then
        while read -r pid; do
            grep -qaE 'qemu|libvirtd' "/proc/$pid/cmdline" 2> /dev/null &&
                kill -9 "$pid" 2> /dev/null
        done < "$TMP/pids"
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP

if ! guest=$(bash "$TOP/tests/guest/build-guest.sh" 2> "$TMP/build-guest.log"); then
    echo "not ok 1 - build the test guest (tests/guest/build-guest.sh)"
    sed 's/^/# /' "$TMP/build-guest.log"
    echo "1..1"
    exit 1
fi
KERNEL=$(sed -n 1p <<< "$guest") INITRD=$(sed -n 2p <<< "$guest")
export TOP OBJ TMP KERNEL INITRD
/usr/bin/python3 - "$@" <<'PYTHON'
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

TOP, OBJ, TMP = os.environ['TOP'], os.environ['OBJ'], os.environ['TMP']
KERNEL, INITRD = os.environ['KERNEL'], os.environ['INITRD']
QEMU = os.path.join(OBJ, 'qemu-system-x86_64')
QSD = os.path.join(OBJ, 'storage-daemon', 'qemu-storage-daemon')
ENV = dict(os.environ, PATH=OBJ + ':' + os.environ['PATH'], LC_ALL='C')
PASS = 'abc123'
MiB = 1 << 20
DISK = 64 * MiB

sys.stdout.reconfigure(line_buffering=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))

# --- TAP --------------------------------------------------------------------
n = 0
failed = 0


def diag(text):
    for line in str(text).rstrip('\n').splitlines()[-40:]:
        print('#   ' + line)


def check(cond, desc, why=''):
    global n, failed
    n += 1
    print('%s %d - %s' % ('ok' if cond else 'not ok', n, desc))
    if not cond:
        failed += 1
        if why:
            diag(why)
    return bool(cond)


# --- processes ----------------------------------------------------------------
procs = []      # our children, stopped after each test
foreign = []    # processes started for us by others (libvirt's QEMU)


def remember(pid):
    """Note a pid for the shell's exit trap, in case this program dies."""
    with open(os.path.join(TMP, 'pids'), 'a') as f:
        f.write('%d\n' % pid)


def kill_foreign():
    while foreign:
        pid = foreign.pop()
        if 'qemu-system' in read('/proc/%d/cmdline' % pid):   # still that QEMU
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def spawn(args, log, **kw):
    f = open(log, 'wb')
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f,
                         stderr=subprocess.STDOUT, env=kw.pop('env', ENV),
                         start_new_session=True, **kw)
    f.close()
    procs.append(p)
    remember(p.pid)
    return p


def stop(p, grace=5):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def run(args, timeout=60, env=None, **kw):
    """Run a command, output (stdout and stderr) and status."""
    try:
        r = subprocess.run(args, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=env or ENV, timeout=timeout, **kw)
        return r.returncode, r.stdout.decode(errors='replace')
    except subprocess.TimeoutExpired:
        return -1, '%s: timed out after %d s' % (args[0], timeout)


def read(path):
    try:
        with open(path, 'rb') as f:
            return f.read().decode(errors='replace')
    except OSError:
        return ''


def sha(data):
    return hashlib.sha256(data).hexdigest()


def sha_file(path):
    with open(path, 'rb') as f:
        return sha(f.read())


class Deadline(Exception):
    pass


def on_alarm(*a):
    raise Deadline('the test ran out of time')


signal.signal(signal.SIGALRM, on_alarm)


# --- QMP ----------------------------------------------------------------------
class QMP:
    """A minimal QMP client: commands, and the events seen meanwhile."""

    def __init__(self, path, timeout=20):
        end = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > end:
                    raise
                time.sleep(0.1)
        self.buf = b''
        self.events = []
        greeting = self._read(timeout)
        assert 'QMP' in greeting, greeting
        r = self.cmd('qmp_capabilities')
        assert 'return' in r, r

    def _read(self, timeout):
        end = time.time() + timeout
        while b'\n' not in self.buf:
            left = end - time.time()
            if left <= 0:
                raise TimeoutError('no QMP message within %d s' % timeout)
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError('QMP connection closed')
            self.buf += data
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)

    def cmd(self, execute, timeout=30, **args):
        msg = {'execute': execute}
        if args:
            msg['arguments'] = args
        return self.send(msg, timeout)

    def send(self, msg, timeout=30):
        self.sock.sendall(json.dumps(msg).encode() + b'\n')
        while True:
            r = self._read(timeout)
            if 'event' in r:
                self.events.append(r)
            else:
                return r

    def wait_event(self, name, timeout=30, **data):
        end = time.time() + timeout
        while True:
            for e in self.events:
                if e['event'] == name and all(e.get('data', {}).get(k) == v
                                              for k, v in data.items()):
                    self.events.remove(e)
                    return e
            left = end - time.time()
            if left <= 0:
                return None
            try:
                r = self._read(left)
            except TimeoutError:
                return None
            if 'event' in r:
                self.events.append(r)

    def close(self):
        self.sock.close()


def node_names(qmp):
    r = qmp.cmd('query-named-block-nodes')
    return sorted(x['node-name'] for x in r.get('return', []))


def pci_devices(qmp):
    r = qmp.cmd('query-pci')
    return sorted((d['slot'], d['function'], d['id']['device'])
                  for b in r.get('return', []) for d in b['devices'])


def status(qmp):
    return qmp.cmd('query-status').get('return', {}).get('status')


# --- the guest ------------------------------------------------------------------
class Console:
    """The guest's "GUEST: " lines, from its serial console file."""

    def __init__(self, path, alive):
        self.console, self.alive = path, alive

    def output(self):
        return read(self.console).replace('\r', '')

    def lines(self):
        return [l[len('GUEST: '):].strip() for l in self.output().split('\n')
                if l.startswith('GUEST: ')]

    def wait(self, regex, timeout=40):
        """The first guest line matching regex (a match object), or None."""
        end = time.time() + timeout
        while True:
            alive = self.alive()
            for l in self.lines():
                m = re.fullmatch(regex, l)
                if m:
                    return m
            if time.time() > end or not alive:
                return None
            time.sleep(0.1)

    def sum(self, dev, off, length, timeout=40):
        m = self.wait(r'sum %s %d %d ([0-9a-f]{64})' % (dev, off, length),
                      timeout)
        return m.group(1) if m else None

    def tail(self):
        return '\n'.join(self.output().split('\n')[-25:])


class Guest(Console):
    """qemu-system-x86_64 booting the test guest, console in a file."""

    def __init__(self, name, actions, extra=(), qmp=True):
        self.name = name
        self.qmp_path = os.path.join(TMP, name + '.qmp')
        args = [QEMU, '-accel', 'tcg', '-m', '256', '-nographic',
                '-no-reboot', '-nic', 'none',
                '-kernel', KERNEL, '-initrd', INITRD,
                '-append', 'console=ttyS0 quiet e2e=' + ','.join(actions)]
        if qmp:
            args += ['-qmp', 'unix:%s,server=on,wait=off' % self.qmp_path]
        self.args = args + list(extra)
        console = os.path.join(TMP, name + '.console')
        self.proc = spawn(self.args, console)
        super().__init__(console, lambda: self.proc.poll() is None)
        self.qmp = QMP(self.qmp_path) if qmp else None

    def exited(self, timeout=40):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.qmp:
            self.qmp.close()
        stop(self.proc)


# --- images -------------------------------------------------------------------
def qimg(*args, timeout=60):
    return run(['qemu-img'] + list(args), timeout)


def qio(*args, timeout=60):
    return run(['qemu-io'] + list(args), timeout)


SECRET_ARG = 'secret,id=sec0,data=' + PASS


def detached_spec(header, payload, qcow2=True):
    f = {'filename': payload}
    if qcow2:
        f = {'driver': 'qcow2', 'file': f}
    return 'json:' + json.dumps({'driver': 'luks', 'key-secret': 'sec0',
                                 'file': f, 'header': {'filename': header}})


def attached_spec(path):
    return 'json:' + json.dumps({'driver': 'luks', 'key-secret': 'sec0',
                                 'file': {'filename': path}})


RANDOM = os.urandom(MiB)        # plaintext at 0
PAT_OFF, PAT_LEN, PAT = 8 * MiB, 64 * 1024, 0x5a   # and a pattern at 8 MiB
RANDOM_FILE = os.path.join(TMP, 'plaintext.bin')
with open(RANDOM_FILE, 'wb') as f:
    f.write(RANDOM)
EXPECT = {(0, MiB): sha(RANDOM), (PAT_OFF, PAT_LEN): sha(bytes([PAT]) * PAT_LEN)}
READ_ACTIONS = ['sum:%s:%d:%d' % ('%s', o, l) for (o, l) in EXPECT]


def reads(dev):
    return [a % dev for a in READ_ACTIONS]


def make_detached(d, name, what):
    """A detached header and a 64 MiB qcow2 payload holding the plaintext."""
    h = os.path.join(d, name + '-header.img')
    p = os.path.join(d, name + '-payload.qcow2')
    rc1, o1 = qimg('create', '--object', SECRET_ARG, '-f', 'luks',
                   '-o', 'key-secret=sec0,iter-time=10',
                   '-o', 'detached-header=true', h)
    rc2, o2 = qimg('create', '-f', 'qcow2', p, str(DISK))
    rc3, o3 = qio('--object', SECRET_ARG, '-c', 'write -s %s 0 1M' % RANDOM_FILE,
                  '-c', 'write -P 0x%x %d %d' % (PAT, PAT_OFF, PAT_LEN),
                  detached_spec(h, p))
    check(rc1 == rc2 == rc3 == 0, '%s: header, qcow2 payload and plaintext made '
          'with qemu-img and qemu-io' % what, o1 + o2 + o3)
    return h, p


def guest_read_ok(g, dev, what):
    for (off, length), want in EXPECT.items():
        got = g.sum(dev, off, length)
        check(got == want, '%s: the guest reads the plaintext at %d+%d'
              % (what, off, length), 'guest: %s\nwant:  %s\n%s'
              % (got, want, g.tail()))


def no_plaintext(path, what):
    with open(path, 'rb') as f:
        data = f.read()
    leaks = [label for label, chunk in
             [('random plaintext', RANDOM[:4096]),
              ('random plaintext (middle)', RANDOM[512 * 1000:512 * 1008]),
              ('0x%x pattern' % PAT, bytes([PAT]) * 512),
              ('0x5c pattern', b'\x5c' * 512),
              ('LUKS magic', b'LUKS\xba\xbe')] if chunk in data]
    check(not leaks, '%s holds no plaintext and no LUKS magic' % what,
          'found: ' + ', '.join(leaks))


def ok_return(r, desc):
    return check('return' in r, desc, json.dumps(r))


# The seed's text, as users type it; HEADER and PAYLOAD stand for the paths.
SEED_OBJECT = '{"qom-type":"secret","id":"libvirt-3-format-secret","data":"abc123"}'
SEED_BLOCKDEVS = [
    '{"driver":"file","filename":"HEADER","node-name":"libvirt-1-storage"}',
    '{"node-name":"libvirt-1-format","read-only":false,"driver":"raw",'
    '"file":"libvirt-1-storage"}',
    '{"driver":"file","filename":"PAYLOAD","node-name":"libvirt-2-storage"}',
    '{"node-name":"libvirt-2-format","read-only":false,"driver":"qcow2",'
    '"file":"libvirt-2-storage"}',
    '{"node-name":"libvirt-3-format","driver":"luks","file":"libvirt-2-format",'
    '"header":"libvirt-1-format","key-secret":"libvirt-3-format-secret"}']
SEED_DEVICE = '{"driver":"virtio-blk-pci","drive":"libvirt-3-format","id":"virtio-disk1"}'
# The seed's seven hotplug steps, step 6 with the secret id of step 1.
SEED_HOTPLUG = [
    '{"execute":"object-add","arguments":{"qom-type":"secret",'
    '"id":"libvirt-4-format-secret","data":"abc123"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file",'
    '"filename":"HEADER","node-name":"libvirt-1-storage"}}',
    '{"execute":"blockdev-add","arguments":{"node-name":"libvirt-1-format",'
    '"read-only":false,"driver":"raw","file":"libvirt-1-storage"}}',
    '{"execute":"blockdev-add","arguments":{"driver":"file",'
    '"filename":"PAYLOAD","node-name":"libvirt-2-storage"}}',
    '{"execute":"blockdev-add","arguments":{"node-name":"libvirt-2-format",'
    '"read-only":false,"driver":"qcow2","file":"libvirt-2-storage"}}',
    '{"execute":"blockdev-add","arguments":{"node-name":"libvirt-3-format",'
    '"driver":"luks","file":"libvirt-2-format","header":"libvirt-1-format",'
    '"key-secret":"libvirt-4-format-secret"}}',
    '{"execute":"device_add","arguments":{"driver":"virtio-blk-pci",'
    '"drive":"libvirt-3-format","id":"virtio-disk2"}}']
# Step 6 as the seed wrote it: a secret id that step 1 did not add.
SEED_STEP6_AS_WRITTEN = SEED_HOTPLUG[5].replace('libvirt-4-format-secret',
                                                'libvirt-2-format-secret')


def seed(text, header, payload):
    """The seed's text with the paths filled in."""
    return (text.replace('HEADER', json.dumps(header)[1:-1])
            .replace('PAYLOAD', json.dumps(payload)[1:-1]))


def step_name(text):
    cmd = json.loads(text)
    a = cmd['arguments']
    return '%s %s' % (cmd['execute'], a.get('node-name') or a.get('id'))


# --- the tests ----------------------------------------------------------------
def test_cmdline(d):
    """1. The seed's VM command line."""
    h, p = make_detached(d, 't1', 'seed command line')
    hsum = sha_file(h)
    W_OFF, W_LEN, W = 16 * MiB, MiB, 0x5c
    extra = ['-object', SEED_OBJECT]
    for b in SEED_BLOCKDEVS:
        extra += ['-blockdev', seed(b, h, p)]
    extra += ['-device', SEED_DEVICE]
    g = Guest('t1', ['list'] + reads('vda') +
              ['write:vda:%d:%d:0x%x' % (W_OFF, W_LEN, W), 'poweroff'],
              extra, qmp=False)
    m = g.wait(r'disk vda (\d+)')
    check(m and int(m.group(1)) == DISK,
          'seed command line: the guest sees vda of 64 MiB', g.tail())
    guest_read_ok(g, 'vda', 'seed command line')
    check(g.wait(r'wrote vda %d %d 0x%x' % (W_OFF, W_LEN, W)),
          'seed command line: the guest writes a 0x%x pattern' % W, g.tail())
    rc = g.exited(30)
    check(rc == 0, 'seed command line: the guest powers off, QEMU exits 0',
          'status %s\n%s' % (rc, g.tail()))
    g.kill()
    rc, out = qio('--object', SECRET_ARG, '-c',
                  'read -P 0x%x %d %d' % (W, W_OFF, W_LEN),
                  '-c', 'read -P 0x%x %d %d' % (PAT, PAT_OFF, PAT_LEN),
                  detached_spec(h, p))
    check(rc == 0 and 'Pattern verification failed' not in out,
          "seed command line: qemu-io reads the guest's pattern through "
          "the detached spec", out)
    plain = os.path.join(d, 't1-plain.raw')
    rc, out = qimg('convert', '--object', SECRET_ARG, '-O', 'raw',
                   detached_spec(h, p), plain)
    ok = rc == 0
    if ok:
        with open(plain, 'rb') as f:
            data = f.read()
        ok = (data[:MiB] == RANDOM and data[W_OFF:W_OFF + W_LEN] == bytes([W]) * W_LEN
              and len(data) == DISK)
        os.unlink(plain)
    check(ok, 'seed command line: the whole plaintext (qemu-img convert) '
          'holds what qemu-io and the guest wrote', out)
    no_plaintext(p, 'seed command line: the qcow2 payload')
    rc, out = qimg('check', p)
    check(rc == 0 and 'No errors were found on the image.' in out,
          'seed command line: qemu-img check on the qcow2 payload is clean', out)
    check(sha_file(h) == hsum, 'seed command line: the header file is unchanged')


def test_hotplug_unplug(d):
    """2. The seed's hotplug over QMP; 3. unplug."""
    h, p = make_detached(d, 't2', 'hotplug')
    # The guest waits for the disk, reads it, then waits for it to go.
    g = Guest('t2', ['list', 'wait:vda:50', 'list'] + reads('vda') +
              ['gone:vda:50', 'list', 'sleep:60'])
    q = g.qmp
    check(g.wait(r'disks\s*') and status(q) == 'running',
          'hotplug: the guest boots with no disk', g.tail())
    nodes0, pci0 = node_names(q), pci_devices(q)
    steps = [seed(t, h, p) for t in SEED_HOTPLUG]
    for i, t in enumerate(steps[:5]):
        ok_return(q.send(json.loads(t)), 'hotplug step %d: %s' % (i + 1, step_name(t)))
    nodes4 = node_names(q)
    # The seed's step 6 as written names a secret that doesn't exist.
    r = q.send(json.loads(SEED_STEP6_AS_WRITTEN))
    desc = r.get('error', {}).get('desc', '')
    check('error' in r, "hotplug: step 6 as the seed wrote it (secret "
          "libvirt-2-format-secret) fails", json.dumps(r))
    check("No secret with id 'libvirt-2-format-secret'" in desc,
          'hotplug: and the error names the missing secret', desc)
    check(status(q) == 'running' and g.proc.poll() is None,
          'hotplug: the VM keeps running')
    check(node_names(q) == nodes4 and 'libvirt-3-format' not in nodes4,
          'hotplug: nothing half-added (no luks node, same nodes as before)',
          'before: %s\nafter: %s' % (nodes4, node_names(q)))
    check(pci_devices(q) == pci0, 'hotplug: no device appeared on the PCI bus')
    for i, t in enumerate(steps[5:]):
        ok_return(q.send(json.loads(t)), 'hotplug step %d: %s' % (i + 6, step_name(t)))
    info = [x for x in q.cmd('query-named-block-nodes').get('return', [])
            if x['node-name'] == 'libvirt-3-format']
    luks = info[0]['image'].get('format-specific', {}).get('data', {}) if info else {}
    check(luks.get('detached-header') is True and info[0]['image']['virtual-size'] == DISK,
          'hotplug: query-named-block-nodes shows the luks node with '
          'detached-header true and 64 MiB', json.dumps(info))
    check(g.wait(r'appeared vda'), 'hotplug: the guest sees the new disk', g.tail())
    m = g.wait(r'disk vda (\d+)')
    check(m and int(m.group(1)) == DISK, 'hotplug: of 64 MiB', g.tail())
    guest_read_ok(g, 'vda', 'hotplug')

    # 3. Unplug.  While plugged, the files are locked.
    rc1, o1 = qimg('info', '-f', 'qcow2', p)
    rc2, o2 = qio('-f', 'raw', '-c', 'read 0 512', h)
    check(rc1 != 0 and 'Failed to get shared "write" lock' in o1 and
          rc2 != 0 and 'Failed to get "write" lock' in o2,
          'unplug: while plugged, the payload and (for writing) the header '
          'are locked', o1 + o2)
    ok_return(q.cmd('device_del', id='virtio-disk2'), 'unplug: device_del virtio-disk2')
    e = q.wait_event('DEVICE_DELETED', 30, device='virtio-disk2')
    check(e, 'unplug: DEVICE_DELETED for virtio-disk2', json.dumps(q.events))
    check(g.wait(r'gone vda'), 'unplug: the disk is gone from the guest', g.tail())
    for node in ['libvirt-3-format', 'libvirt-2-format', 'libvirt-1-format',
                 'libvirt-2-storage', 'libvirt-1-storage']:
        ok_return(q.cmd('blockdev-del', **{'node-name': node}),
                  'unplug: blockdev-del %s' % node)
    ok_return(q.cmd('object-del', id='libvirt-4-format-secret'),
              'unplug: object-del libvirt-4-format-secret')
    check(node_names(q) == nodes0, 'unplug: no block node left',
          'nodes: %s' % node_names(q))
    rc1, o1 = qimg('info', p)
    rc2, o2 = qimg('info', h)
    check(rc1 == 0 and rc2 == 0 and 'file format: qcow2' in o1 and
          'detached header: true' in o2,
          'unplug: qemu-img info (no -U) opens the payload and the header', o1 + o2)
    rc1, o1 = qio('-f', 'qcow2', '-c', 'read 0 512', p)
    rc2, o2 = qio('-f', 'raw', '-c', 'read 0 512', h)
    check(rc1 == 0 and rc2 == 0, 'unplug: both files open read-write again', o1 + o2)
    check(status(q) == 'running' and g.proc.poll() is None,
          'unplug: the VM is still running', g.tail())
    r = q.cmd('quit')
    check(g.exited(20) is not None, 'unplug: the VM quits when asked', json.dumps(r))
    g.kill()
    rc, out = qimg('check', p)
    check(rc == 0 and 'No errors were found' in out,
          'unplug: qemu-img check on the payload is clean', out)


def test_nbd_header(d):
    """4. The header served read-only over NBD."""
    h, p = make_detached(d, 't4', 'nbd header')
    sock = os.path.join(d, 'hdr.nbd')
    nbd = {'driver': 'nbd', 'node-name': 'libvirt-1-storage', 'read-only': True,
           'server': {'type': 'unix', 'path': sock}, 'export': 'header'}
    g = Guest('t4', ['list', 'wait:vda:50'] + reads('vda') + ['poweroff'])
    q = g.qmp
    check(g.wait(r'disks\s*'), 'nbd header: the guest boots with no disk', g.tail())
    ok_return(q.cmd('object-add', **{'qom-type': 'secret', 'id': 'sec-nbd',
                                     'data': PASS}), 'nbd header: object-add secret')
    ok_return(q.cmd('blockdev-add', driver='file', filename=p,
                    **{'node-name': 'libvirt-2-storage'}),
              'nbd header: blockdev-add payload storage')
    ok_return(q.cmd('blockdev-add', driver='qcow2', file='libvirt-2-storage',
                    **{'node-name': 'libvirt-2-format'}),
              'nbd header: blockdev-add payload qcow2 node')
    nodes = node_names(q)
    # No header server yet.
    r = q.cmd('blockdev-add', **nbd)
    desc = r.get('error', {}).get('desc', '')
    check('error' in r and 'Failed to connect' in desc and sock in desc,
          'nbd header: without the server, blockdev-add of the nbd node fails '
          'naming the socket', json.dumps(r))
    luks_inline = {'node-name': 'libvirt-3-format', 'driver': 'luks',
                   'file': 'libvirt-2-format', 'key-secret': 'sec-nbd',
                   'header': {k: v for k, v in nbd.items() if k != 'node-name'}}
    r = q.cmd('blockdev-add', **luks_inline)
    desc = r.get('error', {}).get('desc', '')
    check('error' in r and 'Failed to connect' in desc,
          'nbd header: without the server, a luks node with an inline nbd '
          'header fails too', json.dumps(r))
    r = q.cmd('blockdev-add', **{'node-name': 'libvirt-3-format', 'driver': 'luks',
                                 'file': 'libvirt-2-format', 'key-secret': 'sec-nbd'})
    desc = r.get('error', {}).get('desc', '')
    check('error' in r and 'Volume is not in LUKS format' in desc,
          'nbd header: the payload alone does not open as LUKS', json.dumps(r))
    check(node_names(q) == nodes and status(q) == 'running',
          'nbd header: the failures left no node behind and the VM running',
          '%s\n%s' % (nodes, node_names(q)))
    no_plaintext(p, 'nbd header: the payload alone')

    qsd = spawn([QSD, '--blockdev', json.dumps(
                    {'driver': 'file', 'filename': h, 'node-name': 'hdr',
                     'read-only': True}),
                 '--nbd-server', 'addr.type=unix,addr.path=' + sock,
                 '--export', 'type=nbd,id=exp0,node-name=hdr,name=header,writable=off'],
                os.path.join(d, 'qsd.log'))
    end = time.time() + 20
    while not os.path.exists(sock) and time.time() < end and qsd.poll() is None:
        time.sleep(0.1)
    check(os.path.exists(sock), 'nbd header: qemu-storage-daemon serves the '
          'header read-only on a Unix socket', read(os.path.join(d, 'qsd.log')))
    url = 'nbd+unix:///header?socket=' + sock
    rc, out = qio('-f', 'raw', '-c', 'write 0 512', url)
    check(rc != 0 and ('read-only' in out.lower() or 'Permission denied' in out),
          'nbd header: the export refuses writes', out)
    rc, out = qimg('info', '-f', 'luks', url)
    check(rc == 0 and 'detached header: true' in out,
          'nbd header: qemu-img info over NBD sees a detached header', out)
    ok_return(q.cmd('blockdev-add', **nbd), 'nbd header: blockdev-add the nbd node')
    ok_return(q.cmd('blockdev-add', driver='raw', file='libvirt-1-storage',
                    **{'node-name': 'libvirt-1-format', 'read-only': True}),
              'nbd header: blockdev-add a read-only raw node on it')
    ok_return(q.cmd('blockdev-add', **{'node-name': 'libvirt-3-format',
                                       'driver': 'luks', 'file': 'libvirt-2-format',
                                       'header': 'libvirt-1-format',
                                       'key-secret': 'sec-nbd'}),
              'nbd header: blockdev-add the luks node with the NBD header')
    ok_return(q.cmd('device_add', driver='virtio-blk-pci', drive='libvirt-3-format',
                    id='virtio-disk3'), 'nbd header: device_add')
    check(g.wait(r'appeared vda'), 'nbd header: the guest sees the disk', g.tail())
    guest_read_ok(g, 'vda', 'nbd header')
    check(g.exited(30) == 0, 'nbd header: the guest powers off', g.tail())
    g.kill()
    stop(qsd)


def test_attached(d):
    """5. An ordinary attached LUKS volume."""
    img = os.path.join(d, 't5.luks')
    rc1, o1 = qimg('create', '--object', SECRET_ARG, '-f', 'luks',
                   '-o', 'key-secret=sec0,iter-time=10', img, str(DISK))
    rc2, o2 = qio('--object', SECRET_ARG, '-c', 'write -s %s 0 1M' % RANDOM_FILE,
                  '-c', 'write -P 0x%x %d %d' % (PAT, PAT_OFF, PAT_LEN),
                  attached_spec(img))
    check(rc1 == rc2 == 0, 'attached: LUKS image and plaintext made', o1 + o2)
    rc, out = qimg('info', img)
    check(rc == 0 and 'detached header: false' in out,
          'attached: qemu-img info says detached header: false', out)
    extra = ['-object', 'secret,id=sec-att,data=' + PASS,
             '-blockdev', json.dumps({'driver': 'file', 'filename': img,
                                      'node-name': 'att-storage'}),
             '-blockdev', json.dumps({'driver': 'luks', 'file': 'att-storage',
                                      'key-secret': 'sec-att',
                                      'node-name': 'att-format'}),
             '-device', 'virtio-blk-pci,drive=att-format,id=virtio-disk5']
    g = Guest('t5', ['list'] + reads('vda') + ['write:vda:%d:%d:0x5c' % (16 * MiB, MiB),
                                               'poweroff'], extra, qmp=False)
    m = g.wait(r'disk vda (\d+)')
    check(m and int(m.group(1)) == DISK, 'attached: the guest sees vda of 64 MiB',
          g.tail())
    guest_read_ok(g, 'vda', 'attached')
    check(g.exited(30) == 0 and g.wait(r'wrote vda .*'),
          'attached: the guest writes a pattern and powers off', g.tail())
    g.kill()
    rc, out = qio('--object', SECRET_ARG, '-c', 'read -P 0x5c %d %d' % (16 * MiB, MiB),
                  attached_spec(img))
    check(rc == 0 and 'Pattern verification failed' not in out,
          "attached: qemu-io reads the guest's pattern", out)


# --- libvirt --------------------------------------------------------------------
NOBODY = 65534


HOST_LIBVIRT = ['/etc/libvirt', '/var/lib/libvirt', '/var/cache/libvirt',
                '/var/log/libvirt', '/run/libvirt']


def host_libvirt_state():
    """Names, modes, sizes and mtimes under the host's libvirt directories."""
    h = hashlib.sha256()
    for top in HOST_LIBVIRT:
        h.update(('%s %s\n' % (top, os.path.lexists(top))).encode())
        for root, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(dirs + files):
                st = os.lstat(os.path.join(root, name))
                h.update(('%s/%s %o %d %d\n' % (root, name, st.st_mode, st.st_size,
                                                st.st_mtime_ns)).encode())
    return h.hexdigest()


def test_libvirt(d):
    """6. The seed's hotplug through a private libvirt session daemon."""
    for tool in ('libvirtd', 'virsh', 'setpriv'):
        if not shutil.which(tool, path=ENV['PATH'] + ':/usr/sbin:/sbin'):
            check(False, 'libvirt: %s is installed (packages libvirt-daemon, '
                  'libvirt-daemon-driver-qemu, libvirt-clients, util-linux)' % tool)
            return
    host_before = host_libvirt_state()
    # Everything of the daemon's lives in lv, owned by the user nobody:
    # HOME (config in .config/libvirt, logs and caches in .cache/libvirt),
    # XDG_RUNTIME_DIR (sockets, pid files), the images, kernel and initrd.
    lv = os.path.join(d, 'libvirt')
    home = os.path.join(lv, 'home')
    rt = os.path.join(lv, 'run')
    conf = os.path.join(home, '.config', 'libvirt')
    for x in (home, rt, conf):
        os.makedirs(x, exist_ok=True)
    with open(os.path.join(conf, 'qemu.conf'), 'w') as f:
        f.write('stdio_handler = "file"\n')   # QEMU's output to a file, no virtlogd
    with open(os.path.join(conf, 'libvirtd.conf'), 'w') as f:
        f.write('log_outputs = "3:file:%s/libvirtd.log"\n' % lv)
    h, p = make_detached(lv, 't6', 'libvirt')
    shutil.copy(KERNEL, os.path.join(lv, 'vmlinuz'))
    shutil.copy(INITRD, os.path.join(lv, 'initrd.img'))
    env = {'HOME': home, 'XDG_CONFIG_HOME': os.path.join(home, '.config'),
           'XDG_CACHE_HOME': os.path.join(home, '.cache'),
           'XDG_DATA_HOME': os.path.join(home, '.local', 'share'),
           'XDG_RUNTIME_DIR': rt, 'LC_ALL': 'C',
           'PATH': '/usr/sbin:/usr/bin:/sbin:/bin'}
    as_nobody = ['setpriv', '--reuid=%d' % NOBODY, '--regid=%d' % NOBODY,
                 '--clear-groups', '--']
    # Our QEMU, where it was built; if the user nobody can't get there (a
    # checkout under a private directory), a copy pointed at the firmware.
    emulator, qemu_args = QEMU, ''
    if run(as_nobody + ['test', '-x', QEMU], env=env)[0] != 0:
        emulator = os.path.join(lv, 'qemu-system-x86_64')
        shutil.copy(QEMU, emulator)
        qemu_args = ''.join("\n    <qemu:arg value='-L'/><qemu:arg value='%s'/>" % x
                            for x in ('/usr/share/seabios', '/usr/share/qemu'))
        print('# libvirt: %s is out of reach of the user nobody: using a copy'
              % QEMU)
    for root, dirs, files in os.walk(lv):
        for x in dirs + files:
            os.chown(os.path.join(root, x), NOBODY, NOBODY)
    os.chown(lv, NOBODY, NOBODY)
    os.chmod(rt, 0o700)
    sockpath = os.path.join(rt, 'libvirt', 'libvirt-sock')
    uri = 'qemu+unix:///session?socket=' + sockpath   # no autostart of a daemon
    log = os.path.join(lv, 'libvirtd.log')
    qemu_log = os.path.join(home, '.cache', 'libvirt', 'qemu', 'log', 'e2e-luks.log')
    pidfile = os.path.join(rt, 'libvirt', 'qemu', 'run', 'e2e-luks.pid')

    def virsh(*args, timeout=60):
        return run(as_nobody + ['virsh', '-q', '-c', uri] + list(args), timeout, env=env)

    t0 = time.time()
    daemon = spawn(as_nobody + ['libvirtd'], os.path.join(lv, 'libvirtd.out'), env=env)
    qemu_pid = None
    try:
        up = False
        while time.time() - t0 < 60 and daemon.poll() is None:
            if os.path.exists(sockpath) and virsh('list', '--all', timeout=20)[0] == 0:
                up = True
                break
            time.sleep(0.5)
        if not check(up, 'libvirt: a private libvirtd (session mode, user nobody, '
                     'temporary HOME) answers (after %.0f s)' % (time.time() - t0),
                     'libvirtd %s\n%s%s' % (
                         'exited with status %s' % daemon.poll()
                         if daemon.poll() is not None else 'did not answer within 60 s',
                         read(os.path.join(lv, 'libvirtd.out')), read(log))):
            return
        console = os.path.join(lv, 'console.log')
        actions = ['list', 'wait:vda:60'] + reads('vda') + ['poweroff']
        xml = f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>e2e-luks</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{lv}/vmlinuz</kernel>
    <initrd>{lv}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet e2e={','.join(actions)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>{qemu_args}
  </qemu:commandline>
</domain>
"""
        xml_path = os.path.join(lv, 'domain.xml')
        with open(xml_path, 'w') as f:
            f.write(xml)
        os.chown(xml_path, NOBODY, NOBODY)
        t1 = time.time()
        rc, out = virsh('create', xml_path, timeout=150)
        if not check(rc == 0, 'libvirt: virsh create starts the domain (%.0f s)'
                     % (time.time() - t1), out + read(log) + read(qemu_log)):
            return
        try:
            qemu_pid = int(read(pidfile).strip())
            remember(qemu_pid)
            foreign.append(qemu_pid)
        except ValueError:
            pass
        cmdline = read(qemu_log)
        check(emulator in cmdline and re.search(r'accel[= ]tcg', cmdline),
              'libvirt: the domain runs our qemu-system-x86_64 under TCG', cmdline)

        def domain_alive():
            try:
                os.kill(qemu_pid, 0)
                return True
            except (OSError, TypeError):
                return False
        g = Console(console, domain_alive)
        check(g.wait(r'disks\s*', 40), 'libvirt: the guest boots with no disk', g.tail())

        def monitor(text):
            rc, out = virsh('qemu-monitor-command', 'e2e-luks', text)
            try:
                return rc, json.loads(out.strip().splitlines()[-1]), out
            except (ValueError, IndexError):
                return rc, {}, out
        steps = [seed(t, h, p) for t in SEED_HOTPLUG]
        for i, t in enumerate(steps):
            if i == 5:
                rc, r, out = monitor(SEED_STEP6_AS_WRITTEN)
                check("No secret with id 'libvirt-2-format-secret'" in out and
                      'return' not in r, 'libvirt: step 6 as the seed wrote it fails '
                      'naming the missing secret', out)
            rc, r, out = monitor(t)
            check(rc == 0 and 'return' in r, 'libvirt: step %d: virsh '
                  'qemu-monitor-command %s' % (i + 1, step_name(t)), out)
        check(g.wait(r'appeared vda'), 'libvirt: the guest sees the hotplugged disk',
              g.tail())
        guest_read_ok(g, 'vda', 'libvirt')
        end = time.time() + 30
        state = ''
        while time.time() < end:
            rc, state = virsh('domstate', 'e2e-luks')
            if rc != 0 or 'running' not in state:
                break
            time.sleep(0.5)
        check('running' not in state, 'libvirt: the domain ends when the guest '
              'powers off', state)
    finally:
        if daemon.poll() is None:
            virsh('destroy', 'e2e-luks', timeout=20)
        kill_foreign()
        stop(daemon)
        check(host_libvirt_state() == host_before, "libvirt: the host's libvirt "
              "directories are unchanged (%s)" % ', '.join(HOST_LIBVIRT))


# --- main -----------------------------------------------------------------------
TESTS = [(test_cmdline, 60), (test_hotplug_unplug, 60), (test_nbd_header, 60),
         (test_attached, 60), (test_libvirt, 180)]
want = sys.argv[1:]
try:
    for fn, limit in TESTS:
        if want and fn.__name__[5:] not in want:
            continue
        d = os.path.join(TMP, fn.__name__)
        os.makedirs(d)
        t = time.time()
        signal.alarm(limit)
        try:
            fn(d)
        except Exception as e:   # Deadline, QMP trouble, ...
            check(False, '%s: %s' % (fn.__doc__.split('\n')[0], 'aborted: %s: %s'
                                     % (type(e).__name__, e)))
        finally:
            signal.alarm(0)
            for p in procs:
                stop(p)
            procs.clear()
            kill_foreign()
        print('# %s took %.0f s' % (fn.__doc__.split('\n')[0], time.time() - t))
finally:
    for p in procs:
        stop(p)
    kill_foreign()
    open(os.path.join(TMP, 'pids'), 'w').close()   # nothing left to kill
print('1..%d' % n)
sys.exit(1 if failed else 0)
PYTHON
