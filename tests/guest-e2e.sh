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
#      session daemon) with `virsh qemu-monitor-command`;
#   7. one detached header shared by two disks (issue 6): one header node
#      (file + raw) named as `header` by two luks nodes, over a raw and a
#      qcow2 payload each with its own plaintext; both on the command line
#      (the guest reads vda and vdb), then the second one hotplugged over
#      QMP next to the first, unplugged and added again; x-blockdev-amend
#      refused while the header is shared and working with one user;
#      blockdev-del of the header refused while in use.
# Prints TAP.  Every wait has a timeout (each test has a deadline too: a
# minute per guest test, a minute and a half for the two guests of test 7,
# three for libvirt); leftovers are killed on exit.
# Arguments pick tests: cmdline hotplug_unplug nbd_header attached libvirt
# shared_header.
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

    def wait(self, regex, timeout=40, since=0):
        """The first guest line matching regex (a match object), or None;
        with since, the first after the first since lines."""
        end = time.time() + timeout
        while True:
            alive = self.alive()
            for l in self.lines()[since:]:
                m = re.fullmatch(regex, l)
                if m:
                    return m
            if time.time() > end or not alive:
                return None
            time.sleep(0.1)

    def sum(self, dev, off, length, timeout=40, since=0):
        m = self.wait(r'sum %s %d %d ([0-9a-f]{64})' % (dev, off, length),
                      timeout, since)
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
# A second disk's own plaintext, same offsets (the shared header test).
RANDOM_B, PAT_B = os.urandom(MiB), 0xa7
RANDOM_B_FILE = os.path.join(TMP, 'plaintext-b.bin')
with open(RANDOM_B_FILE, 'wb') as f:
    f.write(RANDOM_B)
EXPECT_B = {(0, MiB): sha(RANDOM_B),
            (PAT_OFF, PAT_LEN): sha(bytes([PAT_B]) * PAT_LEN)}
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


def guest_read_ok(g, dev, what, expect=EXPECT, since=0):
    for (off, length), want in expect.items():
        got = g.sum(dev, off, length, since=since)
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
              ('second random plaintext', RANDOM_B[:4096]),
              ('0x%x pattern' % PAT_B, bytes([PAT_B]) * 512),
              ('0x3c pattern', b'\x3c' * 512),
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


# --- one header, two disks ------------------------------------------------------
DISK_B = 48 * MiB           # disk B's size tells vda and vdb apart
W_OFF, W_LEN = 16 * MiB, MiB   # where the guest writes: 0x5c on A, 0x3c on B
NEW_PASS = 'def456'         # the passphrase of the key slot added by amend
HDR = 'libvirt-1-format'    # the header node, raw over libvirt-1-storage
LUKS_A, LUKS_B = 'libvirt-3-format', 'libvirt-5-format'


def make_shared(d, name, what):
    """One detached header, a raw payload A of 64 MiB and a qcow2 payload B
    of 48 MiB, each holding its own plaintext (EXPECT, EXPECT_B)."""
    h = os.path.join(d, name + '-header.img')
    pa = os.path.join(d, name + '-a.raw')
    pb = os.path.join(d, name + '-b.qcow2')
    out, ok = '', True
    for rc, o in [qimg('create', '--object', SECRET_ARG, '-f', 'luks',
                       '-o', 'key-secret=sec0,iter-time=10',
                       '-o', 'detached-header=true', h),
                  qimg('create', '-f', 'raw', pa, str(DISK)),
                  qimg('create', '-f', 'qcow2', pb, str(DISK_B)),
                  qio('--object', SECRET_ARG,
                      '-c', 'write -s %s 0 1M' % RANDOM_FILE,
                      '-c', 'write -P 0x%x %d %d' % (PAT, PAT_OFF, PAT_LEN),
                      detached_spec(h, pa, qcow2=False)),
                  qio('--object', SECRET_ARG,
                      '-c', 'write -s %s 0 1M' % RANDOM_B_FILE,
                      '-c', 'write -P 0x%x %d %d' % (PAT_B, PAT_OFF, PAT_LEN),
                      detached_spec(h, pb))]:
        ok, out = ok and rc == 0, out + o
    if check(ok, '%s: one header, a raw and a qcow2 payload, each with its '
             'own plaintext (qemu-img, qemu-io through the detached spec)'
             % what, out):
        return h, pa, pb
    return None


def shared_blockdevs(h, pa, pb, secret_a, secret_b):
    """As libvirt lays them out: the header (file + raw node), payload A
    (file + raw) and its luks node, payload B (file + qcow2) and its luks
    node; both luks nodes name the same header node."""
    def node(name, **kw):
        return dict(kw, **{'node-name': name})
    hdr = [node('libvirt-1-storage', driver='file', filename=h),
           node(HDR, driver='raw', file='libvirt-1-storage',
                **{'read-only': False})]
    a = [node('libvirt-2-storage', driver='file', filename=pa),
         node('libvirt-2-format', driver='raw', file='libvirt-2-storage',
              **{'read-only': False}),
         node(LUKS_A, driver='luks', file='libvirt-2-format', header=HDR,
              **{'key-secret': secret_a})]
    b = [node('libvirt-4-storage', driver='file', filename=pb),
         node('libvirt-4-format', driver='qcow2', file='libvirt-4-storage',
              **{'read-only': False}),
         node(LUKS_B, driver='luks', file='libvirt-4-format', header=HDR,
              **{'key-secret': secret_b})]
    return hdr, a, b


def header_users(q):
    """The parents of the header node: (node, child name, permissions)."""
    g = q.cmd('x-debug-query-block-graph').get('return', {})
    names = {x['id']: x['name'] for x in g.get('nodes', [])}
    return sorted((names.get(e['parent']), e['name'], tuple(sorted(e['perm'])))
                  for e in g.get('edges', []) if names.get(e['child']) == HDR)


def shared_users_ok(q, users, what):
    got = header_users(q)
    check([u[:2] for u in got] == [(u, 'header') for u in users] and
          all('write' not in u[2] for u in got),
          '%s: the header node has the users %s, as their "header" child, '
          'none of them with write permission' % (what, ' and '.join(users)),
          json.dumps(got))


def amend_add_key(q, job, node):
    return q.cmd('x-blockdev-amend', **{
        'job-id': job, 'node-name': node,
        'options': {'driver': 'luks', 'state': 'active',
                    'new-secret': 'sec-new', 'iter-time': 10}})


def read_back(h, p, qcow2, passphrase, checks, what):
    """qemu-io through the detached spec: read -P for each (byte, off, len)."""
    args = ['--object', 'secret,id=sec0,data=' + passphrase]
    for byte, off, length in checks:
        args += ['-c', 'read -P 0x%x %d %d' % (byte, off, length)]
    rc, out = qio(*args, detached_spec(h, p, qcow2))
    check(rc == 0 and 'Pattern verification failed' not in out and
          out.count('read ') == len(checks), what, out)


def test_shared_header(d):
    """7. One detached header shared by two disks."""
    shared_cmdline(d)
    shared_hotplug(d)


def shared_cmdline(d):
    """Both disks on the command line."""
    what = 'shared header'
    files = make_shared(d, 't7', what)
    if not files:
        return
    h, pa, pb = files
    hsum = sha_file(h)
    hdr, a, b = shared_blockdevs(h, pa, pb, 'sec-a', 'sec-b')
    extra = ['-object', 'secret,id=sec-a,data=' + PASS,
             '-object', 'secret,id=sec-b,data=' + PASS]
    for x in hdr + a + b:
        extra += ['-blockdev', json.dumps(x)]
    extra += ['-device', 'virtio-blk-pci,drive=%s,id=virtio-disk0' % LUKS_A,
              '-device', 'virtio-blk-pci,drive=%s,id=virtio-disk1' % LUKS_B]
    g = Guest('t7', ['list'] + reads('vda') + reads('vdb') +
              ['write:vda:%d:%d:0x5c' % (W_OFF, W_LEN),
               'write:vdb:%d:%d:0x3c' % (W_OFF, W_LEN), 'poweroff'], extra)
    shared_users_ok(g.qmp, [LUKS_A, LUKS_B], what)
    check(g.wait(r'disks vda vdb') and g.wait(r'disk vda %d' % DISK) and
          g.wait(r'disk vdb %d' % DISK_B), '%s: the guest sees vda (raw '
          'payload, 64 MiB) and vdb (qcow2 payload, 48 MiB)' % what, g.tail())
    guest_read_ok(g, 'vda', what + ', vda')
    guest_read_ok(g, 'vdb', what + ', vdb', EXPECT_B)
    sa, sb = g.sum('vda', 0, MiB), g.sum('vdb', 0, MiB)
    check(sa and sb and sa != sb, '%s: and the two disks read differently'
          % what, '%s\n%s' % (sa, sb))
    check(g.wait(r'wrote vda %d %d 0x5c' % (W_OFF, W_LEN)) and
          g.wait(r'wrote vdb %d %d 0x3c' % (W_OFF, W_LEN)),
          '%s: the guest writes a pattern on each disk' % what, g.tail())
    rc = g.exited(30)
    check(rc == 0, '%s: the guest powers off, QEMU exits 0' % what,
          'status %s\n%s' % (rc, g.tail()))
    g.kill()
    read_back(h, pa, False, PASS, [(0x5c, W_OFF, W_LEN), (PAT, PAT_OFF, PAT_LEN)],
              "%s: qemu-io reads vda's pattern and plaintext through "
              "payload A's detached spec" % what)
    read_back(h, pb, True, PASS, [(0x3c, W_OFF, W_LEN), (PAT_B, PAT_OFF, PAT_LEN)],
              "%s: qemu-io reads vdb's pattern and plaintext through "
              "payload B's detached spec" % what)
    no_plaintext(pa, '%s: the raw payload A' % what)
    no_plaintext(pb, '%s: the qcow2 payload B' % what)
    check(sha_file(h) == hsum, '%s: the header file is unchanged' % what)


def shared_hotplug(d):
    """Disk A on the command line, disk B added and removed over QMP."""
    what = 'shared header hotplug'
    files = make_shared(d, 't7h', what)
    if not files:
        return
    h, pa, pb = files
    hdr, a, b = shared_blockdevs(h, pa, pb, 'sec-a', 'sec-b')
    extra = ['-object', 'secret,id=sec-a,data=' + PASS]
    for x in hdr + a:
        extra += ['-blockdev', json.dumps(x)]
    extra += ['-device', 'virtio-blk-pci,drive=%s,id=virtio-disk0' % LUKS_A]
    # vdb comes, goes and comes back; vda is read each time.
    g = Guest('t7h', ['list'] + reads('vda') + ['wait:vdb:50', 'list'] +
              reads('vdb') + reads('vda') + ['gone:vdb:50', 'wait:vdb:50'] +
              reads('vda') + reads('vdb') +
              ['write:vda:%d:%d:0x5c' % (W_OFF, W_LEN),
               'write:vdb:%d:%d:0x3c' % (W_OFF, W_LEN), 'poweroff'], extra)
    q = g.qmp
    check(g.wait(r'disks vda') and g.wait(r'disk vda %d' % DISK),
          '%s: the guest boots with vda only' % what, g.tail())
    guest_read_ok(g, 'vda', what + ', vda')
    for obj in [('sec-b', PASS), ('sec-new', NEW_PASS)]:
        ok_return(q.cmd('object-add', **{'qom-type': 'secret', 'id': obj[0],
                                         'data': obj[1]}),
                  '%s: object-add secret %s' % (what, obj[0]))
    mark = len(g.lines())
    for x in b:
        ok_return(q.cmd('blockdev-add', **x), '%s: blockdev-add %s%s' % (
            what, x['node-name'], ' (header: the existing %s)' % HDR
            if 'header' in x else ''))
    ok_return(q.cmd('device_add', driver='virtio-blk-pci', drive=LUKS_B,
                    id='virtio-disk1'), '%s: device_add virtio-disk1' % what)
    shared_users_ok(q, [LUKS_A, LUKS_B], what)
    check(g.wait(r'appeared vdb', since=mark) and
          g.wait(r'disk vdb %d' % DISK_B, since=mark),
          '%s: the guest sees vdb of 48 MiB' % what, g.tail())
    guest_read_ok(g, 'vdb', what + ', vdb', EXPECT_B, since=mark)
    guest_read_ok(g, 'vda', what + ', vda with vdb plugged', since=mark)

    # No key update while another luks node uses the header.
    hsum = sha_file(h)
    for node, other in [(LUKS_A, LUKS_B), (LUKS_B, LUKS_A)]:
        r = amend_add_key(q, 'amend-' + node, node)
        desc = r.get('error', {}).get('desc', '')
        check('error' in r and 'Cannot update the keys of detached LUKS header'
              in desc and 'Permission conflict' in desc and other in desc,
              '%s: x-blockdev-amend on %s fails while %s shares the header, '
              'naming the permission conflict' % (what, node, other),
              json.dumps(r))
    check(q.cmd('query-jobs').get('return') == [] and status(q) == 'running'
          and sha_file(h) == hsum, '%s: no job left, the header file '
          'unchanged, the VM keeps running' % what)
    shared_users_ok(q, [LUKS_A, LUKS_B], what + ', after the failed amend')

    # Unplug disk B; disk A stays.
    ok_return(q.cmd('device_del', id='virtio-disk1'),
              '%s: device_del virtio-disk1' % what)
    check(q.wait_event('DEVICE_DELETED', 30, device='virtio-disk1'),
          '%s: DEVICE_DELETED for virtio-disk1' % what, json.dumps(q.events))
    check(g.wait(r'gone vdb', since=mark), '%s: vdb is gone from the guest'
          % what, g.tail())
    for x in reversed(b):
        ok_return(q.cmd('blockdev-del', **{'node-name': x['node-name']}),
                  '%s: blockdev-del %s' % (what, x['node-name']))
    r = q.cmd('blockdev-del', **{'node-name': HDR})
    check(r.get('error', {}).get('desc') == 'Block device %s is in use' % HDR,
          '%s: blockdev-del of the header node while %s uses it fails: '
          '"in use"' % (what, LUKS_A), json.dumps(r))
    shared_users_ok(q, [LUKS_A], what + ', after the unplug')

    # With a single user, the key update works.
    r = amend_add_key(q, 'amend1', LUKS_A)
    if ok_return(r, '%s: x-blockdev-amend on %s, now the only user, adds a key '
                 'slot (secret sec-new)' % (what, LUKS_A)):
        e = q.wait_event('JOB_STATUS_CHANGE', 30, id='amend1', status='concluded')
        jobs = [j for j in q.cmd('query-jobs').get('return', [])
                if j['id'] == 'amend1']
        check(e and jobs and 'error' not in jobs[0],
              '%s: the amend job concludes without error' % what,
              json.dumps(jobs) + json.dumps(q.events))
        ok_return(q.cmd('job-dismiss', id='amend1'), '%s: job-dismiss' % what)
        check(sha_file(h) != hsum, '%s: the header file changed' % what)
    shared_users_ok(q, [LUKS_A], what + ', after the amend')

    # Disk B again, opened with the new key slot; vda still reads as before.
    mark = len(g.lines())
    b[-1]['key-secret'] = 'sec-new'
    for x in b:
        ok_return(q.cmd('blockdev-add', **x), '%s: blockdev-add %s again%s' % (
            what, x['node-name'], ' (new secret)' if 'header' in x else ''))
    ok_return(q.cmd('device_add', driver='virtio-blk-pci', drive=LUKS_B,
                    id='virtio-disk2'), '%s: device_add virtio-disk2' % what)
    check(g.wait(r'appeared vdb', since=mark),
          '%s: the guest sees vdb again' % what, g.tail())
    guest_read_ok(g, 'vda', what + ', vda after the unplug and the amend',
                  since=mark)
    guest_read_ok(g, 'vdb', what + ', vdb opened with the new key slot',
                  EXPECT_B, since=mark)
    check(g.wait(r'wrote vda %d %d 0x5c' % (W_OFF, W_LEN), since=mark) and
          g.wait(r'wrote vdb %d %d 0x3c' % (W_OFF, W_LEN), since=mark),
          '%s: the guest writes a pattern on each disk' % what, g.tail())
    rc = g.exited(30)
    check(rc == 0, '%s: the guest powers off, QEMU exits 0' % what,
          'status %s\n%s' % (rc, g.tail()))
    g.kill()
    read_back(h, pa, False, NEW_PASS,
              [(0x5c, W_OFF, W_LEN), (PAT, PAT_OFF, PAT_LEN)],
              "%s: qemu-io with the new secret reads vda's pattern and "
              "plaintext through payload A's detached spec" % what)
    read_back(h, pb, True, PASS,
              [(0x3c, W_OFF, W_LEN), (PAT_B, PAT_OFF, PAT_LEN)],
              "%s: qemu-io with the old secret reads vdb's pattern and "
              "plaintext through payload B's detached spec" % what)
    no_plaintext(pa, '%s: the raw payload A' % what)
    no_plaintext(pb, '%s: the qcow2 payload B' % what)
    rc, out = qimg('check', pb)
    check(rc == 0 and 'No errors were found' in out,
          '%s: qemu-img check on the qcow2 payload is clean' % what, out)


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
         (test_attached, 60), (test_libvirt, 180), (test_shared_header, 90)]
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
