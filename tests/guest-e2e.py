#!/usr/bin/python3
"""End to end in a real guest: a tiny Linux guest (built and cached by
tests/guest/build-guest.sh) under TCG reads and writes LUKS volumes with a
detached header, set up as the README does it: its VM command line and
hotplug steps are read from README.md.  QEMU is run through the
QEMU tree's own python/qemu (QEMUMachine, its QMP connection and console
socket); libvirt's QEMU is libvirt's, talked to with virsh.  Prints TAP.

Tests (arguments pick some by name):
  cmdline        the README's VM command line (secret, five -blockdev, -device)
  cryptsetup_header  a LUKS1 detached header made by cryptsetup, on the
                 command line, over a raw payload
  hotplug_unplug the README's hotplug over QMP, its wrong secret id failing
                 cleanly, then unplug: device_del, blockdev-del, object-del
  nbd_header     the header served read-only over NBD by qemu-storage-daemon,
                 and what happens while that server is absent
  attached       an ordinary attached LUKS volume, unchanged
  libvirt        the README's hotplug through a private, unprivileged libvirt
                 session daemon with `virsh qemu-monitor-command`
  shared_header  one header node named by two luks nodes (raw and qcow2
                 payloads), on the command line and hotplugged; amend refused
                 while shared; blockdev-del of the header refused while used
  luks2_header   a LUKS2 detached header made by cryptsetup, its plaintext
                 written by tests/lib/luks2.py: the README's LUKS2 VM command
                 line, then the same disk hotplugged over QMP and unplugged;
                 what the guest wrote is decrypted by luks2.py

Adding a test: write a function f(d) (d: its own directory) decorated with
@guest_test(seconds).  make_detached() makes a payload, a header (with
qemu-img, or any make_header(header, payload) such as a cryptsetup
command) and known plaintext in it; boot_read_write() is a whole
command-line test for such a disk; Guest() boots the guest with a list of
actions (tests/guest/init) and QMP (Guest(start=False) stays paused, e.g.
for -incoming); guest_reads() checks what the guest reads, read_back()
what qemu-io reads afterwards.  Every wait has a timeout and each test a
deadline; whatever a test started is stopped after it.
Runs as root (the libvirt test switches to the user nobody with setpriv).
"""

import asyncio
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import luks2
from proc import (ENV, QEMU_SYSTEM, QSD, TOP, MiB, missing_tools, python_qemu, qemu_img, qemu_io,
                  qmp_ok, read, remove, run, scratch, sha256, sha256_data, text)
from readme_text import (README_LUKS2_PATHS, README_PATHS, monitor_commands, readme_block,
                         vm_disk_options)
from specs import qcow2, secret, spec
from tap import check, tap

try:
    python_qemu()
    from qemu.machine import QEMUMachine
    from qemu.qmp import QMPError
    from qemu.qmp.legacy import QEMUMonitorProtocol
except ImportError as e:
    check(False, "QEMU's own python library imports from %s" % python_qemu(), str(e))
    tap.done()

PASS = 'abc123'
SECRET_ARG = secret(data=PASS)
DISK = 64 * MiB
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))   # clean up on timeout


# --- the guest ----------------------------------------------------------------
class Guest:
    """qemu-system-x86_64 booting the test guest under TCG (QEMUMachine).

    The guest runs `actions` (tests/guest/init) and reports in "GUEST: "
    lines on its serial console, which is QEMUMachine's console socket,
    copied to NAME.console by a thread.  QEMU starts paused (-S) and runs
    only once the console is connected, so no line is lost.  QMP is
    QEMUMachine's: command() returns the return value and raises on an
    error, ok() is a command as a TAP line, qmp() returns the response
    (for the commands that must fail), event() waits for one."""

    running = []        # stopped after each test

    def __init__(self, d, name, actions, args=(), start=True):
        self.console_path = os.path.join(d, name + '.console')
        self.vm = QEMUMachine(QEMU_SYSTEM, name=name, base_temp_dir=d, sock_dir=d,
                              log_dir=d, qmp_timer=30)
        self.vm.set_console()
        self.vm.add_args('-S', '-accel', 'tcg', '-m', '256', '-no-reboot', '-nic', 'none',
                         '-kernel', KERNEL, '-initrd', INITRD,
                         '-append', 'console=ttyS0 quiet e2e=' + ','.join(actions), *args)
        self.text = ''
        Guest.running.append(self)
        self.vm.launch()
        sock = self.vm.console_socket
        self.reader = threading.Thread(target=self._read_console, args=(sock,), daemon=True)
        self.reader.start()
        end = time.time() + 10
        while not self.command('qom-get', path='/chardevs/console', property='connected'):
            if time.time() > end:
                raise TimeoutError('the console socket did not connect')
            time.sleep(0.05)
        if start:
            self.command('cont')

    def _read_console(self, sock):
        with open(self.console_path, 'w') as log:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                chunk = data.decode(errors='replace').replace('\r', '')
                log.write(chunk)
                log.flush()
                self.text += chunk

    def command(self, cmd, **args):
        """The return value of cmd (QEMUMachine.command(): ExecuteError
        if QMP answers with an error)."""
        return self.vm.command(cmd, conv_keys=False, **args)

    def ok(self, desc, cmd, **args):
        """One TAP line: cmd succeeds."""
        return qmp_ok(self.vm, desc, cmd, **args)

    def qmp(self, cmd, **args):
        """The QMP response ({"return": ...} or {"error": ...})."""
        return self.vm.qmp(cmd, args_dict=args)

    def send(self, text):
        """The response to a QMP command given as the JSON text users type."""
        msg = json.loads(text)
        return self.qmp(msg['execute'], **msg.get('arguments', {}))

    def send_ok(self, desc, text):
        """One TAP line: the command of that JSON text succeeds."""
        msg = json.loads(text)
        return self.ok(desc, msg['execute'], **msg.get('arguments', {}))

    def event(self, name, timeout=30, **data):
        """The next event name whose data has these values, or None."""
        try:
            return self.vm.event_wait(name, float(timeout), {'data': data} if data else None)
        except asyncio.TimeoutError:
            return None

    def alive(self):
        return self.vm.is_running()

    def lines(self):
        return [x[len('GUEST: '):].strip() for x in self.text.split('\n')
                if x.startswith('GUEST: ')]

    def wait(self, regex, timeout=40, since=0):
        """The first guest line (after the first `since`) matching regex,
        as a match object, or None after timeout or when QEMU is gone."""
        end = time.time() + timeout
        while True:
            alive = self.alive()
            for line in self.lines()[since:]:
                m = re.fullmatch(regex, line)
                if m:
                    return m
            if time.time() > end or not alive:
                return None
            time.sleep(0.1)

    def sum(self, dev, off, length, since=0):
        m = self.wait(r'sum %s %d %d ([0-9a-f]{64})' % (dev, off, length), since=since)
        return m.group(1) if m else None

    def tail(self):
        return '\n'.join(self.text.split('\n')[-25:])

    def exited(self, timeout=40):
        """Wait for QEMU to exit by itself: its exit status, or None (then
        it is killed)."""
        end = time.time() + timeout
        while self.alive() and time.time() < end:
            time.sleep(0.1)
        if self.alive():
            self.kill()
            return None
        try:
            self.vm.wait()
        except Exception as e:          # noqa: BLE001 (QMP already gone)
            print('# %s: %s' % (type(e).__name__, e))
        self.reader.join(5)
        return self.vm.exitcode()

    def kill(self):
        try:
            self.vm.kill()
        except Exception as e:          # noqa: BLE001
            print('# kill: %s: %s' % (type(e).__name__, e))


def stop_all():
    while Guest.running:
        Guest.running.pop().kill()


# --- other processes (qemu-storage-daemon, libvirtd) ----------------------------
procs = []


def spawn(args, log, env=None):
    with open(log, 'wb') as f:
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f,
                             stderr=subprocess.STDOUT, env=env or ENV,
                             start_new_session=True)
    procs.append(p)
    return p


def stop(p, grace=5):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def start_qsd(d, name, args, timeout=20):
    """qemu-storage-daemon with args, a QMP monitor on d/NAME.qmp and a pid
    file d/NAME.pid, its output in d/NAME.log.  It writes the pid file once
    it has processed all its options, so when this returns (once there is
    a pid file, or it exited, or timeout seconds passed) what args ask for
    is set up.  Returns (its Popen, its QMP socket)."""
    qmp, pidfile = os.path.join(d, name + '.qmp'), os.path.join(d, name + '.pid')
    p = spawn([QSD, '--chardev', 'socket,id=qmp0,path=%s,server=on,wait=off' % qmp,
               '--monitor', 'chardev=qmp0', '--pidfile', pidfile] + args,
              os.path.join(d, name + '.log'))
    end = time.time() + timeout
    while not os.path.exists(pidfile) and time.time() < end and p.poll() is None:
        time.sleep(0.1)
    return p, qmp


def qsd_command(qmp, cmd, **args):
    """The return value of QMP cmd to the qemu-storage-daemon whose monitor
    listens on qmp, in a connection of its own (python/qemu's
    qmp.legacy.QEMUMonitorProtocol; an error raises)."""
    with QEMUMonitorProtocol(qmp) as mon:
        mon.connect()
        mon.settimeout(30)
        return mon.command(cmd, **args)


def quit_qsd(p, qmp):
    """Ask it to quit over QMP and wait for it to exit; stop it if it has
    not within 10 s.  It answers quit, then exits, closing the connection:
    closing ours then raises EOFError (7.2's qmp.legacy), which is no
    failure."""
    try:
        qsd_command(qmp, 'quit')
    except EOFError:
        pass
    except (OSError, QMPError) as e:
        print('# qemu-storage-daemon: quit over QMP failed: %s: %s' % (type(e).__name__, e))
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        print('# qemu-storage-daemon did not exit within 10 s of quit')
    stop(p)


# --- images and plaintext ----------------------------------------------------------
def detached_spec(header, payload, qcow2_payload=True):
    """The json: spec of a luks node over payload (a qcow2 image, or raw)
    with header, keyed by the secret sec0."""
    return spec(qcow2(payload) if qcow2_payload else payload, header)


class Plain:
    """Known plaintext for a disk: 1 MiB of random bytes at 0 and a byte
    pattern at 8 MiB; expect maps (offset, length) to its sha256."""
    PAT_OFF, PAT_LEN = 8 * MiB, 64 * 1024

    def __init__(self, d, name, pattern):
        self.random, self.pattern = os.urandom(MiB), pattern
        self.file = os.path.join(d, name + '.plain')
        with open(self.file, 'wb') as f:
            f.write(self.random)
        self.expect = {(0, MiB): sha256_data(self.random),
                       (self.PAT_OFF, self.PAT_LEN): sha256_data(bytes([pattern]) * self.PAT_LEN)}

    def qemu_io_writes(self):
        return ['-c', 'write -s %s 0 1M' % self.file,
                '-c', 'write -P 0x%x %d %d' % (self.pattern, self.PAT_OFF, self.PAT_LEN)]

    def reads(self, dev):
        """Guest actions that read it back from dev."""
        return ['sum:%s:%d:%d' % (dev, o, n) for (o, n) in self.expect]

    def leaks(self):
        return [('random plaintext', self.random[:4096]),
                ('random plaintext (middle)', self.random[512 * 1000:512 * 1008]),
                ('0x%x pattern' % self.pattern, bytes([self.pattern]) * 512)]


def qemu_img_header(h, p):
    """Make the detached header h with qemu-img (the payload p exists)."""
    return qemu_img('create', '--object', SECRET_ARG, '-f', 'luks',
                    '-o', 'key-secret=sec0,iter-time=10', '-o', 'detached-header=true', h)


def make_detached(d, name, what, plain, payload_fmt='qcow2', size=DISK,
                  make_header=qemu_img_header):
    """A payload (qcow2 or raw) of size bytes, a detached header for it
    (make_header(header, payload) -> Result; passphrase PASS), and plain
    written by qemu-io through the detached spec."""
    h = os.path.join(d, name + '-header.img')
    p = os.path.join(d, name + '-payload.' + payload_fmt)
    rs = [qemu_img('create', '-f', payload_fmt, p, str(size)), make_header(h, p)]
    rs.append(qemu_io('--object', SECRET_ARG, *plain.qemu_io_writes(),
                      detached_spec(h, p, payload_fmt == 'qcow2')))
    check(all(r.ok for r in rs), '%s: %s payload, header, and plaintext written through '
          'the detached spec' % (what, payload_fmt), '\n'.join(map(str, rs)))
    return h, p


def guest_reads(g, dev, what, plain, since=0):
    for (off, length), want in plain.expect.items():
        got = g.sum(dev, off, length, since=since)
        check(got == want, '%s: the guest reads the plaintext at %d+%d' % (what, off, length),
              'guest: %s\nwant:  %s\n%s' % (got, want, g.tail()))


def no_plaintext(path, what, plains):
    data = read(path)
    leaks = [label for p in plains for label, chunk in p.leaks() if chunk in data]
    leaks += [label for label, chunk in [('0x5c pattern', b'\x5c' * 512),
                                         ('0x3c pattern', b'\x3c' * 512),
                                         ('LUKS magic', b'LUKS\xba\xbe')] if chunk in data]
    check(not leaks, '%s holds no plaintext and no LUKS magic' % what, 'found: ' + ', '.join(leaks))


def read_back(h, p, qcow2, passphrase, patterns, what):
    """qemu-io through the detached spec: read -P for each (byte, off, len)."""
    args = ['--object', secret(data=passphrase)]
    for byte, off, length in patterns:
        args += ['-c', 'read -P 0x%x %d %d' % (byte, off, length)]
    r = qemu_io(*args, detached_spec(h, p, qcow2))
    check(r.ok and 'Pattern verification failed' not in r.out
          and r.out.count('read ') == len(patterns), what, r)


def error_of(r):
    """The class and the text of the error that the QMP response r is
    (('', '') when it is none)."""
    e = r.get('error', {})
    return e.get('class', ''), e.get('desc', '')


def node_names(g):
    return sorted(x['node-name'] for x in g.command('query-named-block-nodes'))


def pci_devices(g):
    return sorted((d['slot'], d['function'], d['id']['device'])
                  for b in g.command('query-pci') for d in b['devices'])


def status(g):
    return g.command('query-status')['status']


def powered_off(g, what):
    rc = g.exited(30)
    check(rc == 0, '%s: the guest powers off, QEMU exits 0' % what, 'status %s\n%s'
          % (rc, g.tail()))


# --- the README's text, as users type it -------------------------------------
# Its VM command line and hotplug steps are read from README.md (the blocks
# marked <!-- readme-test: guest-e2e ... -->), with README_PATHS standing
# for the header and the payload.
def readme_vm():
    """The -object, -blockdev and -device options of the README's VM."""
    return vm_disk_options(readme_block('guest-e2e', 'cmdline'))


def readme_hotplug():
    """The README's hotplug steps (QMP commands as JSON text)."""
    return monitor_commands(readme_block('guest-e2e', 'hotplug_unplug'))


def wrong_secret(steps):
    """Step 6 naming a secret that step 1 did not add (the README's warning)."""
    return steps[5].replace(json.loads(steps[0])['arguments']['id'], 'libvirt-2-format-secret')


def readme_luks2_vm():
    """The -object, -blockdev and -device options of the README's LUKS2 VM."""
    return vm_disk_options(readme_block('guest-e2e', 'luks2_header'))


def fill(text, header, payload, paths=README_PATHS):
    """The README's text with the paths filled in."""
    for path, mine in zip(paths, (header, payload)):
        text = text.replace(path, json.dumps(mine)[1:-1])
    return text


def step_name(text):
    cmd = json.loads(text)
    a = cmd['arguments']
    return '%s %s' % (cmd['execute'], a.get('node-name') or a.get('id'))


# --- the tests -------------------------------------------------------------------
TESTS = []
BY_NAME_ONLY = set()


def guest_test(seconds, by_name_only=False):
    """Register a test with its deadline; by_name_only: it runs only when
    named on the command line (it changes the host)."""
    def add(fn):
        TESTS.append((fn, seconds))
        if by_name_only:
            BY_NAME_ONLY.add(fn.__name__)
        return fn
    return add


def boot_read_write(d, name, what, plain, h, p, args, qcow2=True):
    """Boot with a disk set up by args (vda, 64 MiB, over header h and
    payload p holding plain): the guest reads plain, writes a pattern and
    powers off; then qemu-io and qemu-img read both back through the
    detached spec, the payload shows no plaintext, the header is unchanged."""
    hsum = sha256(h)
    W_OFF, W_LEN, W = 16 * MiB, MiB, 0x5c
    g = Guest(d, name, ['list'] + plain.reads('vda') +
              ['write:vda:%d:%d:0x%x' % (W_OFF, W_LEN, W), 'poweroff'], args)
    m = g.wait(r'disk vda (\d+)')
    check(m and int(m.group(1)) == DISK, what + ': the guest sees vda of 64 MiB', g.tail())
    guest_reads(g, 'vda', what, plain)
    check(g.wait(r'wrote vda %d %d 0x%x' % (W_OFF, W_LEN, W)),
          what + ': the guest writes a 0x%x pattern' % W, g.tail())
    powered_off(g, what)
    read_back(h, p, qcow2, PASS, [(W, W_OFF, W_LEN), (plain.pattern, plain.PAT_OFF,
                                                      plain.PAT_LEN)],
              what + ": qemu-io reads the guest's pattern through the detached spec")
    out = os.path.join(d, name + '-plain.raw')
    remove(out)
    r = qemu_img('convert', '--object', SECRET_ARG, '-O', 'raw', detached_spec(h, p, qcow2), out)
    data = read(out) if r.ok else b''
    check(r.ok and data[:MiB] == plain.random and len(data) == DISK
          and data[W_OFF:W_OFF + W_LEN] == bytes([W]) * W_LEN,
          what + ': the whole plaintext (qemu-img convert) holds what qemu-io and the '
          'guest wrote', r)
    no_plaintext(p, what + ': the payload', [plain])
    if qcow2:
        r = qemu_img('check', p)
        check(r.ok and 'No errors were found on the image.' in r.out,
              what + ': qemu-img check on the qcow2 payload is clean', r)
    check(sha256(h) == hsum, what + ': the header file is unchanged')


@guest_test(60)
def cmdline(d):
    """The README's VM command line."""
    what = 'README command line'
    plain = Plain(d, 't1', 0x5a)
    h, p = make_detached(d, 't1', what, plain)
    args = [x for opt, value in readme_vm() for x in (opt, fill(value, h, p))]
    boot_read_write(d, 't1', what, plain, h, p, args)


@guest_test(60)
def cryptsetup_header(d):
    """A LUKS1 detached header made by cryptsetup, on the command line."""
    what = 'cryptsetup header'
    plain = Plain(d, 't8', 0x5a)

    def luks_format(h, p):
        return run(['cryptsetup', '--batch-mode', 'luksFormat', '--type', 'luks1',
                    '--pbkdf-force-iterations', '1000', '--key-file', '-', '--header', h, p],
                   stdin=PASS.encode())
    h, p = make_detached(d, 't8', what, plain, 'raw', make_header=luks_format)
    args = ['-object', 'secret,id=sec-cs,data=' + PASS,
            '-blockdev', json.dumps({'driver': 'file', 'filename': h, 'node-name': 'cs-hdr'}),
            '-blockdev', json.dumps({'driver': 'file', 'filename': p, 'node-name': 'cs-data'}),
            '-blockdev', json.dumps({'driver': 'luks', 'file': 'cs-data', 'header': 'cs-hdr',
                                     'key-secret': 'sec-cs', 'node-name': 'cs-luks'}),
            '-device', 'virtio-blk-pci,drive=cs-luks,id=virtio-disk8']
    boot_read_write(d, 't8', what, plain, h, p, args, qcow2=False)


@guest_test(60)
def hotplug_unplug(d):
    """The README's hotplug over QMP, then unplug."""
    what = 'hotplug'
    plain = Plain(d, 't2', 0x5a)
    h, p = make_detached(d, 't2', what, plain)
    # The guest waits for the disk, reads it, then waits for it to go.
    g = Guest(d, 't2', ['list', 'wait:vda:50', 'list'] + plain.reads('vda') +
              ['gone:vda:50', 'list', 'sleep:60'])
    check(g.wait(r'disks\s*') and status(g) == 'running',
          what + ': the guest boots with no disk', g.tail())
    nodes0, pci0 = node_names(g), pci_devices(g)
    steps = [fill(t, h, p) for t in readme_hotplug()]
    for i, t in enumerate(steps[:5]):
        g.send_ok('%s step %d: %s' % (what, i + 1, step_name(t)), t)
    nodes4 = node_names(g)
    cls, why = error_of(g.send(wrong_secret(steps)))
    check(cls == 'GenericError', what + ': step 6 naming a secret that was not added '
          '(libvirt-2-format-secret) fails', '%s: %s' % (cls, why))
    check("No secret with id 'libvirt-2-format-secret'" in why,
          what + ': and the error names the missing secret', why)
    check(status(g) == 'running' and g.alive(), what + ': the VM keeps running')
    check(node_names(g) == nodes4 and 'libvirt-3-format' not in nodes4,
          what + ': nothing half-added (no luks node, same nodes as before)',
          'before: %s\nafter: %s' % (nodes4, node_names(g)))
    check(pci_devices(g) == pci0, what + ': no device appeared on the PCI bus')
    for i, t in enumerate(steps[5:], 6):
        g.send_ok('%s step %d: %s' % (what, i, step_name(t)), t)
    info = [x for x in g.command('query-named-block-nodes')
            if x['node-name'] == 'libvirt-3-format']
    luks = info[0]['image'].get('format-specific', {}).get('data', {}) if info else {}
    check(luks.get('detached-header') is True and info[0]['image']['virtual-size'] == DISK,
          what + ': query-named-block-nodes shows the luks node with detached-header '
          'true and 64 MiB', json.dumps(info))
    check(g.wait(r'appeared vda'), what + ': the guest sees the new disk', g.tail())
    m = g.wait(r'disk vda (\d+)')
    check(m and int(m.group(1)) == DISK, what + ': of 64 MiB', g.tail())
    guest_reads(g, 'vda', what, plain)

    # Unplug.  While plugged, the files are locked.
    what = 'unplug'
    r1 = qemu_img('info', '-f', 'qcow2', p)
    r2 = qemu_io('-f', 'raw', '-c', 'read 0 512', h)
    check(r1.refused and 'Failed to get shared "write" lock' in r1.out and
          r2.refused and 'Failed to get "write" lock' in r2.out,
          what + ': while plugged, the payload and (for writing) the header are locked',
          '%s\n%s' % (r1, r2))
    dev = json.loads(steps[6])['arguments']['id']
    g.ok(what + ': device_del ' + dev, 'device_del', id=dev)
    check(g.event('DEVICE_DELETED', 30, device=dev),
          what + ': DEVICE_DELETED for ' + dev, json.dumps(g.vm.get_qmp_events()))
    check(g.wait(r'gone vda'), what + ': the disk is gone from the guest', g.tail())
    for node in ['libvirt-3-format', 'libvirt-2-format', 'libvirt-1-format',
                 'libvirt-2-storage', 'libvirt-1-storage']:
        g.ok(what + ': blockdev-del ' + node, 'blockdev-del', **{'node-name': node})
    sid = json.loads(steps[0])['arguments']['id']
    g.ok(what + ': object-del ' + sid, 'object-del', id=sid)
    check(node_names(g) == nodes0, what + ': no block node left', 'nodes: %s' % node_names(g))
    r1, r2 = qemu_img('info', p), qemu_img('info', h)
    check(r1.ok and r2.ok and 'file format: qcow2' in r1.out and
          'detached header: true' in r2.out,
          what + ': qemu-img info (no -U) opens the payload and the header', '%s\n%s' % (r1, r2))
    r1 = qemu_io('-f', 'qcow2', '-c', 'read 0 512', p)
    r2 = qemu_io('-f', 'raw', '-c', 'read 0 512', h)
    check(r1.ok and r2.ok, what + ': both files open read-write again', '%s\n%s' % (r1, r2))
    check(status(g) == 'running' and g.alive(), what + ': the VM is still running', g.tail())
    g.command('quit')
    check(g.exited(20) is not None, what + ': the VM quits when asked', g.tail())
    r = qemu_img('check', p)
    check(r.ok and 'No errors were found' in r.out,
          what + ': qemu-img check on the payload is clean', r)


@guest_test(60)
def nbd_header(d):
    """The header served read-only over NBD."""
    what = 'nbd header'
    plain = Plain(d, 't4', 0x5a)
    h, p = make_detached(d, 't4', what, plain)
    sock = os.path.join(d, 'hdr.nbd')
    nbd = {'driver': 'nbd', 'node-name': 'libvirt-1-storage', 'read-only': True,
           'server': {'type': 'unix', 'path': sock}, 'export': 'header'}
    g = Guest(d, 't4', ['list', 'wait:vda:50'] + plain.reads('vda') + ['poweroff'])
    check(g.wait(r'disks\s*'), what + ': the guest boots with no disk', g.tail())
    g.ok(what + ': object-add secret',
         'object-add', **{'qom-type': 'secret', 'id': 'sec-nbd', 'data': PASS})
    g.ok(what + ': blockdev-add payload storage',
         'blockdev-add', driver='file', filename=p, **{'node-name': 'libvirt-2-storage'})
    g.ok(what + ': blockdev-add payload qcow2 node',
         'blockdev-add', driver='qcow2', file='libvirt-2-storage',
         **{'node-name': 'libvirt-2-format'})
    nodes = node_names(g)
    # No header server yet.
    cls, why = error_of(g.qmp('blockdev-add', **nbd))
    check(cls == 'GenericError' and 'Failed to connect' in why and sock in why,
          what + ': without the server, blockdev-add of the nbd node fails naming the socket',
          '%s: %s' % (cls, why))
    cls, why = error_of(g.qmp('blockdev-add', **{
        'node-name': 'libvirt-3-format', 'driver': 'luks', 'file': 'libvirt-2-format',
        'key-secret': 'sec-nbd', 'header': {k: v for k, v in nbd.items() if k != 'node-name'}}))
    check(cls == 'GenericError' and 'Failed to connect' in why, what + ': without the '
          'server, a luks node with an inline nbd header fails too', '%s: %s' % (cls, why))
    cls, why = error_of(g.qmp('blockdev-add', **{
        'node-name': 'libvirt-3-format', 'driver': 'luks', 'file': 'libvirt-2-format',
        'key-secret': 'sec-nbd'}))
    check(cls == 'GenericError' and 'Volume is not in LUKS format' in why,
          what + ': the payload alone does not open as LUKS', '%s: %s' % (cls, why))
    check(node_names(g) == nodes and status(g) == 'running',
          what + ': the failures left no node behind and the VM running',
          '%s\n%s' % (nodes, node_names(g)))
    no_plaintext(p, what + ': the payload alone', [plain])

    qsd, qsd_qmp = start_qsd(d, 'qsd', [
        '--blockdev', json.dumps({'driver': 'file', 'filename': h, 'node-name': 'hdr',
                                  'read-only': True}),
        '--nbd-server', 'addr.type=unix,addr.path=' + sock,
        '--export', 'type=nbd,id=exp0,node-name=hdr,name=header,writable=off'])
    try:
        exports = [(x['id'], x['type'], x['node-name'])
                   for x in qsd_command(qsd_qmp, 'query-block-exports')]
    except (OSError, QMPError) as e:
        exports = '%s: %s' % (type(e).__name__, e)
    check(exports == [('exp0', 'nbd', 'hdr')] and os.path.exists(sock),
          what + ': qemu-storage-daemon serves the header read-only on a Unix socket '
          '(query-block-exports on its QMP monitor)',
          'exports: %s\n%s' % (exports, text(os.path.join(d, 'qsd.log'))))
    url = 'nbd+unix:///header?socket=' + sock
    r = qemu_io('-f', 'raw', '-c', 'write 0 512', url)
    check(r.refused and ('read-only' in r.out.lower() or 'Permission denied' in r.out),
          what + ': the export refuses writes', r)
    r = qemu_img('info', '-f', 'luks', url)
    check(r.ok and 'detached header: true' in r.out,
          what + ': qemu-img info over NBD sees a detached header', r)
    g.ok(what + ': blockdev-add the nbd node', 'blockdev-add', **nbd)
    g.ok(what + ': blockdev-add a read-only raw node on it',
         'blockdev-add', driver='raw', file='libvirt-1-storage',
         **{'node-name': 'libvirt-1-format', 'read-only': True})
    g.ok(what + ': blockdev-add the luks node with the NBD header',
         'blockdev-add', **{'node-name': 'libvirt-3-format', 'driver': 'luks',
                            'file': 'libvirt-2-format', 'header': 'libvirt-1-format',
                            'key-secret': 'sec-nbd'})
    g.ok(what + ': device_add',
         'device_add', driver='virtio-blk-pci', drive='libvirt-3-format', id='virtio-disk3')
    check(g.wait(r'appeared vda'), what + ': the guest sees the disk', g.tail())
    guest_reads(g, 'vda', what, plain)
    powered_off(g, what)
    quit_qsd(qsd, qsd_qmp)


@guest_test(60)
def attached(d):
    """An ordinary attached LUKS volume."""
    what = 'attached'
    plain = Plain(d, 't5', 0x5a)
    img = os.path.join(d, 't5.luks')
    vol = spec(img)
    r1 = qemu_img('create', '--object', SECRET_ARG, '-f', 'luks',
                  '-o', 'key-secret=sec0,iter-time=10', img, str(DISK))
    r2 = qemu_io('--object', SECRET_ARG, *plain.qemu_io_writes(), vol)
    check(r1.ok and r2.ok, what + ': LUKS image and plaintext made', '%s\n%s' % (r1, r2))
    r = qemu_img('info', img)
    check(r.ok and 'detached header: false' in r.out,
          what + ': qemu-img info says detached header: false', r)
    args = ['-object', 'secret,id=sec-att,data=' + PASS,
            '-blockdev', json.dumps({'driver': 'file', 'filename': img,
                                     'node-name': 'att-storage'}),
            '-blockdev', json.dumps({'driver': 'luks', 'file': 'att-storage',
                                     'key-secret': 'sec-att', 'node-name': 'att-format'}),
            '-device', 'virtio-blk-pci,drive=att-format,id=virtio-disk5']
    g = Guest(d, 't5', ['list'] + plain.reads('vda') +
              ['write:vda:%d:%d:0x5c' % (16 * MiB, MiB), 'poweroff'], args)
    m = g.wait(r'disk vda (\d+)')
    check(m and int(m.group(1)) == DISK, what + ': the guest sees vda of 64 MiB', g.tail())
    guest_reads(g, 'vda', what, plain)
    check(g.wait(r'wrote vda .*'), what + ': the guest writes a pattern', g.tail())
    powered_off(g, what)
    r = qemu_io('--object', SECRET_ARG, '-c', 'read -P 0x5c %d %d' % (16 * MiB, MiB), vol)
    check(r.ok and 'Pattern verification failed' not in r.out,
          what + ": qemu-io reads the guest's pattern", r)


# --- libvirt --------------------------------------------------------------------
NOBODY = 65534
HOST_LIBVIRT = ['/etc/libvirt', '/var/lib/libvirt', '/var/cache/libvirt',
                '/var/log/libvirt', '/run/libvirt']
DOMAIN = 'e2e-luks'


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


DOMAIN_XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{lv}/vmlinuz</kernel>
    <initrd>{lv}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet e2e={actions}</cmdline>
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


class FileConsole(Guest):
    """The guest lines of a console that libvirt writes to a file."""

    def __init__(self, path, alive):         # pylint: disable=super-init-not-called
        self.path, self.alive = path, alive

    @property
    def text(self):
        return text(self.path).replace('\r', '')


@guest_test(180)
def libvirt(d):
    """The README's hotplug through a private libvirt session daemon."""
    what = 'libvirt'
    gone = missing_tools(commands=['libvirtd', 'virsh', 'setpriv'])
    if not check(not gone, what + ': libvirtd, virsh and setpriv are installed (packages '
                 'libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients, util-linux)',
                 'missing: %s' % gone):
        return
    host_before = host_libvirt_state()
    # Everything of the daemon's lives in lv, owned by the user nobody:
    # HOME (config in .config/libvirt, logs and caches in .cache/libvirt),
    # XDG_RUNTIME_DIR (sockets, pid files), the images, kernel and initrd.
    lv = os.path.join(d, 'libvirt')
    home, rt = os.path.join(lv, 'home'), os.path.join(lv, 'run')
    conf = os.path.join(home, '.config', 'libvirt')
    for x in (home, rt, conf):
        os.makedirs(x, exist_ok=True)
    with open(os.path.join(conf, 'qemu.conf'), 'w') as f:
        f.write('stdio_handler = "file"\n')   # QEMU's output to a file, no virtlogd
    with open(os.path.join(conf, 'libvirtd.conf'), 'w') as f:
        f.write('log_outputs = "3:file:%s/libvirtd.log"\n' % lv)
    plain = Plain(lv, 't6', 0x5a)
    h, p = make_detached(lv, 't6', what, plain)
    shutil.copy(KERNEL, os.path.join(lv, 'vmlinuz'))
    shutil.copy(INITRD, os.path.join(lv, 'initrd.img'))
    env = {'HOME': home, 'XDG_CONFIG_HOME': os.path.join(home, '.config'),
           'XDG_CACHE_HOME': os.path.join(home, '.cache'),
           'XDG_DATA_HOME': os.path.join(home, '.local', 'share'),
           'XDG_RUNTIME_DIR': rt, 'LC_ALL': 'C', 'PATH': '/usr/sbin:/usr/bin:/sbin:/bin'}
    as_nobody = ['setpriv', '--reuid=%d' % NOBODY, '--regid=%d' % NOBODY, '--clear-groups', '--']
    # Our QEMU, where it was built; if the user nobody can't get there (a
    # checkout under a private directory), a copy pointed at the firmware.
    emulator, qemu_args = QEMU_SYSTEM, ''
    if not run(as_nobody + ['test', '-x', QEMU_SYSTEM], env=env).ok:
        emulator = os.path.join(lv, 'qemu-system-x86_64')
        shutil.copy(QEMU_SYSTEM, emulator)
        qemu_args = ''.join("\n    <qemu:arg value='-L'/><qemu:arg value='%s'/>" % x
                            for x in ('/usr/share/seabios', '/usr/share/qemu'))
        print('# %s is out of reach of the user nobody: using a copy' % QEMU_SYSTEM)
    for root, dirs, files in os.walk(lv):
        for x in dirs + files:
            os.chown(os.path.join(root, x), NOBODY, NOBODY)
    os.chown(lv, NOBODY, NOBODY)
    os.chmod(rt, 0o700)
    sockpath = os.path.join(rt, 'libvirt', 'libvirt-sock')
    uri = 'qemu+unix:///session?socket=' + sockpath   # no autostart of a daemon
    log = os.path.join(lv, 'libvirtd.log')
    qemu_log = os.path.join(home, '.cache', 'libvirt', 'qemu', 'log', DOMAIN + '.log')
    pidfile = os.path.join(rt, 'libvirt', 'qemu', 'run', DOMAIN + '.pid')

    def virsh(*args, timeout=60):
        return run(as_nobody + ['virsh', '-q', '-c', uri] + list(args), timeout, env=env)

    t0 = time.time()
    daemon = spawn(as_nobody + ['libvirtd'], os.path.join(lv, 'libvirtd.out'), env=env)
    qemu_pid = None
    try:
        up = False
        while time.time() - t0 < 60 and daemon.poll() is None:
            if os.path.exists(sockpath) and virsh('list', '--all', timeout=20).ok:
                up = True
                break
            time.sleep(0.5)
        if not check(up, what + ': a private libvirtd (session mode, user nobody, temporary '
                     'HOME) answers (after %.0f s)' % (time.time() - t0),
                     'libvirtd %s\n%s%s' % (
                         'exited with status %s' % daemon.poll() if daemon.poll() is not None
                         else 'did not answer within 60 s',
                         text(os.path.join(lv, 'libvirtd.out')), text(log))):
            return
        console = os.path.join(lv, 'console.log')
        actions = ['list', 'wait:vda:60'] + plain.reads('vda') + ['poweroff']
        xml_path = os.path.join(lv, 'domain.xml')
        with open(xml_path, 'w') as f:
            f.write(DOMAIN_XML.format(name=DOMAIN, lv=lv, actions=','.join(actions),
                                      emulator=emulator, console=console,
                                      qemu_args=qemu_args))
        os.chown(xml_path, NOBODY, NOBODY)
        # A persistent domain: once it ends, libvirt still knows it and
        # says how it ended.
        r = virsh('define', xml_path)
        check(r.ok, what + ': virsh define', r)
        t1 = time.time()
        r = virsh('start', DOMAIN, timeout=150)
        if not check(r.ok, what + ': virsh start starts the domain (%.0f s)'
                     % (time.time() - t1), '%s\n%s%s' % (r, text(log), text(qemu_log))):
            return
        try:
            qemu_pid = int(read(pidfile).strip())
        except (ValueError, AttributeError):
            pass
        cmdline = text(qemu_log)
        check(emulator in cmdline and re.search(r'accel[= ]tcg', cmdline),
              what + ': the domain runs our qemu-system-x86_64 under TCG', cmdline)

        def domain_alive():
            try:
                os.kill(qemu_pid, 0)
                return True
            except (OSError, TypeError):
                return False
        g = FileConsole(console, domain_alive)
        check(g.wait(r'disks\s*', 40), what + ': the guest boots with no disk', g.tail())

        def monitor(text):
            r = virsh('qemu-monitor-command', DOMAIN, text)
            try:
                return r, json.loads(r.out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                return r, {}
        steps = [fill(t, h, p) for t in readme_hotplug()]
        for i, t in enumerate(steps, 1):
            if i == 6:
                r, resp = monitor(wrong_secret(steps))
                check("No secret with id 'libvirt-2-format-secret'" in r.out and
                      'return' not in resp, what + ': step 6 naming a secret that was not '
                      'added fails naming it', r)
            r, resp = monitor(t)
            check(r.ok and 'return' in resp, '%s: step %d: virsh qemu-monitor-command %s'
                  % (what, i, step_name(t)), r)
        check(g.wait(r'appeared vda'), what + ': the guest sees the hotplugged disk', g.tail())
        guest_reads(g, 'vda', what, plain)
        # The guest powers off by itself.  libvirt passes through "in
        # shutdown" between QEMU's SHUTDOWN event and the process's exit, so
        # wait for "shut off", keeping every state seen for the report.
        end, r, seen = time.time() + 30, None, []
        while time.time() < end:
            r = virsh('domstate', '--reason', DOMAIN)
            state = r.out.strip()
            if not seen or seen[-1] != state:
                seen.append(state)
            if not r.ok or state.startswith('shut off'):
                break
            time.sleep(0.5)
        check(r.ok and r.out.strip() == 'shut off (shutdown)',
              what + ': when the guest powers off, virsh domstate --reason says '
              '"shut off (shutdown)"', 'states seen: %s\n%s' % (' -> '.join(seen), r))
        check(daemon.poll() is None and virsh('list', '--all').ok,
              what + ': and the daemon is still running and answering',
              'libvirtd exit status %s\n%s' % (daemon.poll(), text(log)))
    finally:
        if daemon.poll() is None:
            virsh('destroy', DOMAIN, timeout=20)
            virsh('undefine', DOMAIN, timeout=20)
        if qemu_pid and 'qemu-system' in text('/proc/%d/cmdline' % qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)
        stop(daemon)
        check(host_libvirt_state() == host_before, "%s: the host's libvirt directories are "
              "unchanged (%s)" % (what, ', '.join(HOST_LIBVIRT)))


@guest_test(300, by_name_only=True)
def libvirt_system(d):
    """The README's hotplug on libvirt's system daemon (qemu:///system),
    with the installed QEMU as user libvirt-qemu and DAC labelling on.
    Only when named: it starts the host's libvirtd and virtlogd if they
    are not running (scripts/lib/package-check, after installing the
    packages and libvirt-daemon-system), and stops those it started."""
    what = 'libvirt system'
    uri = 'qemu:///system'
    gone = missing_tools(commands=['libvirtd', 'virtlogd', 'virsh'])
    if not check(not gone and os.geteuid() == 0, what + ': run as root, with libvirtd, '
                 'virtlogd and virsh installed (libvirt-daemon-system)', 'missing: %s' % gone):
        return
    try:
        qemu_user = pwd.getpwnam('libvirt-qemu')
    except KeyError:
        check(False, what + ': the user libvirt-qemu exists (libvirt-daemon-system)')
        return
    env = dict(ENV, PATH='/usr/sbin:/usr/bin:/sbin:/bin')

    def virsh(*args, timeout=60):
        return run(['virsh', '-q', '-c', uri] + list(args), timeout, env=env)
    started = []
    for daemon, pidfile in (('virtlogd', '/run/virtlogd.pid'),
                            ('libvirtd', '/run/libvirtd.pid')):
        if not run(['pgrep', '-x', daemon]).ok:
            r = run([daemon, '-d'], env=env)
            if not check(r.ok, what + ': %s -d starts' % daemon, r):
                return
            started.append(pidfile)
    t0 = time.time()
    while time.time() - t0 < 60 and not virsh('version', timeout=20).ok:
        time.sleep(0.5)
    r = virsh('version')
    if not check(r.ok and 'QEMU 7.2.22' in r.out, what + ': virsh -c qemu:///system version '
                 'names QEMU 7.2.22 (after %.0f s)' % (time.time() - t0), r):
        return
    lv = os.path.join('/var/lib/libvirt/images', 'luksdh-e2e-%d' % os.getpid())
    os.makedirs(lv)
    qemu_pid = None
    try:
        os.chmod(lv, 0o755)
        plain = Plain(lv, 't7', 0x6b)
        h, p = make_detached(lv, 't7', what, plain)
        shutil.copy(KERNEL, os.path.join(lv, 'vmlinuz'))
        shutil.copy(INITRD, os.path.join(lv, 'initrd.img'))
        console = os.path.join(lv, 'console.log')
        actions = ['list', 'wait:vda:60'] + plain.reads('vda') + ['poweroff']
        xml_path = os.path.join(lv, 'domain.xml')
        with open(xml_path, 'w') as f:
            f.write(DOMAIN_XML.format(name=DOMAIN, lv=lv, actions=','.join(actions),
                                      emulator=QEMU_SYSTEM, console=console, qemu_args=''))
        r = virsh('define', xml_path)
        check(r.ok, what + ': virsh define', r)
        r = virsh('start', DOMAIN, timeout=150)
        if not check(r.ok, what + ': virsh start starts the domain', '%s\n%s' % (
                r, text('/var/log/libvirt/qemu/%s.log' % DOMAIN))):
            return
        try:
            qemu_pid = int(read('/run/libvirt/qemu/%s.pid' % DOMAIN).strip())
        except (ValueError, AttributeError):
            pass
        user = run(['ps', '-o', 'user=', '-p', str(qemu_pid)]).out.strip()
        cmdline = text('/proc/%s/cmdline' % qemu_pid).split('\0')
        check(user == 'libvirt-qemu' and cmdline[:1] == [QEMU_SYSTEM],
              what + ': the domain runs %s as libvirt-qemu' % QEMU_SYSTEM,
              'user %r, command %r' % (user, cmdline[:1]))
        r = virsh('qemu-monitor-command', '--hmp', DOMAIN, 'info version')
        check(r.ok and '+luksdh' in r.out, what + ": HMP 'info version' names the series' "
              'package', r)

        def domain_alive():
            try:
                os.kill(qemu_pid, 0)
                return True
            except (OSError, TypeError):
                return False
        g = FileConsole(console, domain_alive)
        check(g.wait(r'disks\s*', 60), what + ': the guest boots with no disk', g.tail())

        def monitor(text):
            r = virsh('qemu-monitor-command', DOMAIN, text)
            try:
                return r, json.loads(r.out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                return r, {}
        steps = [fill(t, h, p) for t in readme_hotplug()]
        # Root's files, which libvirt doesn't know: DAC refuses QEMU
        r, resp = monitor(steps[1])
        check('Permission denied' in r.out and 'return' not in resp,
              what + ": the header, root's and unknown to libvirt, is refused: "
              'Permission denied', r)
        # As the README says: the files go to the user QEMU runs as
        for x in (h, p):
            os.chown(x, qemu_user.pw_uid, qemu_user.pw_gid)
        for i, t in enumerate(steps, 1):
            r, resp = monitor(t)
            check(r.ok and 'return' in resp, '%s: step %d: virsh qemu-monitor-command %s'
                  % (what, i, step_name(t)), r)
        check(g.wait(r'appeared vda'), what + ': the guest sees the hotplugged disk', g.tail())
        guest_reads(g, 'vda', what, plain)
        end = time.time() + 30
        while time.time() < end and domain_alive():
            time.sleep(0.5)
        r = virsh('domstate', '--reason', DOMAIN)
        check(r.ok and r.out.strip() == 'shut off (shutdown)',
              what + ': the guest powers off: "shut off (shutdown)"', r)
    finally:
        virsh('destroy', DOMAIN, timeout=20)
        virsh('undefine', DOMAIN, timeout=20)
        if qemu_pid and 'qemu-system' in text('/proc/%d/cmdline' % qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)
        shutil.rmtree(lv, ignore_errors=True)
        for pidfile in reversed(started):
            try:
                os.kill(int(read(pidfile).strip()), signal.SIGTERM)
            except (OSError, ValueError, AttributeError):
                pass


# --- one header, two disks ------------------------------------------------------
DISK_B = 48 * MiB            # disk B's size tells vda and vdb apart
W_OFF, W_LEN = 16 * MiB, MiB   # where the guest writes: 0x5c on A, 0x3c on B
NEW_PASS = 'def456'          # the passphrase of the key slot added by amend
HDR = 'libvirt-1-format'     # the header node, raw over libvirt-1-storage
LUKS_A, LUKS_B = 'libvirt-3-format', 'libvirt-5-format'
WRITES = ['write:vda:%d:%d:0x5c' % (W_OFF, W_LEN), 'write:vdb:%d:%d:0x3c' % (W_OFF, W_LEN)]


def make_shared(d, name, what, pa_plain, pb_plain):
    """One detached header, a raw payload A of 64 MiB and a qcow2 payload B
    of 48 MiB, each holding its own plaintext."""
    h = os.path.join(d, name + '-header.img')
    pa, pb = os.path.join(d, name + '-a.raw'), os.path.join(d, name + '-b.qcow2')
    rs = [qemu_img('create', '--object', SECRET_ARG, '-f', 'luks',
                   '-o', 'key-secret=sec0,iter-time=10', '-o', 'detached-header=true', h),
          qemu_img('create', '-f', 'raw', pa, str(DISK)),
          qemu_img('create', '-f', 'qcow2', pb, str(DISK_B)),
          qemu_io('--object', SECRET_ARG, *pa_plain.qemu_io_writes(),
                  detached_spec(h, pa, qcow2_payload=False)),
          qemu_io('--object', SECRET_ARG, *pb_plain.qemu_io_writes(), detached_spec(h, pb))]
    if check(all(r.ok for r in rs), '%s: one header, a raw and a qcow2 payload, each with '
             'its own plaintext (qemu-img, qemu-io through the detached spec)' % what,
             '\n'.join(map(str, rs))):
        return h, pa, pb
    return None


def shared_blockdevs(h, pa, pb, secret_a, secret_b):
    """As libvirt lays them out: the header (file + raw node), payload A
    (file + raw) and its luks node, payload B (file + qcow2) and its luks
    node; both luks nodes name the same header node."""
    def node(name, **kw):
        return dict(kw, **{'node-name': name})
    hdr = [node('libvirt-1-storage', driver='file', filename=h),
           node(HDR, driver='raw', file='libvirt-1-storage', **{'read-only': False})]
    a = [node('libvirt-2-storage', driver='file', filename=pa),
         node('libvirt-2-format', driver='raw', file='libvirt-2-storage', **{'read-only': False}),
         node(LUKS_A, driver='luks', file='libvirt-2-format', header=HDR,
              **{'key-secret': secret_a})]
    b = [node('libvirt-4-storage', driver='file', filename=pb),
         node('libvirt-4-format', driver='qcow2', file='libvirt-4-storage',
              **{'read-only': False}),
         node(LUKS_B, driver='luks', file='libvirt-4-format', header=HDR,
              **{'key-secret': secret_b})]
    return hdr, a, b


def shared_users_ok(g, users, what):
    """The header node's parents are users, as their "header" child,
    none of them with write permission."""
    graph = g.command('x-debug-query-block-graph')
    names = {x['id']: x['name'] for x in graph.get('nodes', [])}
    got = sorted((names.get(e['parent']), e['name'], tuple(sorted(e['perm'])))
                 for e in graph.get('edges', []) if names.get(e['child']) == HDR)
    check([u[:2] for u in got] == [(u, 'header') for u in users] and
          all('write' not in u[2] for u in got),
          '%s: the header node has the users %s, as their "header" child, none of them '
          'with write permission' % (what, ' and '.join(users)), json.dumps(got))


def amend_add_key(job, node):
    """The arguments of an x-blockdev-amend that adds a key slot (secret sec-new)."""
    return {'job-id': job, 'node-name': node,
            'options': {'driver': 'luks', 'state': 'active', 'new-secret': 'sec-new',
                        'iter-time': 10}}


@guest_test(90)
def shared_header(d):
    """One detached header shared by two disks."""
    shared_cmdline(d)
    shared_hotplug(d)


def shared_cmdline(d):
    """Both disks on the command line."""
    what = 'shared header'
    pa_plain, pb_plain = Plain(d, 't7a', 0x5a), Plain(d, 't7b', 0xa7)
    files = make_shared(d, 't7', what, pa_plain, pb_plain)
    if not files:
        return
    h, pa, pb = files
    hsum = sha256(h)
    hdr, a, b = shared_blockdevs(h, pa, pb, 'sec-a', 'sec-b')
    args = ['-object', 'secret,id=sec-a,data=' + PASS, '-object', 'secret,id=sec-b,data=' + PASS]
    for x in hdr + a + b:
        args += ['-blockdev', json.dumps(x)]
    args += ['-device', 'virtio-blk-pci,drive=%s,id=virtio-disk0' % LUKS_A,
             '-device', 'virtio-blk-pci,drive=%s,id=virtio-disk1' % LUKS_B]
    g = Guest(d, 't7', ['list'] + pa_plain.reads('vda') + pb_plain.reads('vdb') + WRITES
              + ['poweroff'], args)
    shared_users_ok(g, [LUKS_A, LUKS_B], what)
    check(g.wait(r'disks vda vdb') and g.wait(r'disk vda %d' % DISK) and
          g.wait(r'disk vdb %d' % DISK_B), '%s: the guest sees vda (raw payload, 64 MiB) and '
          'vdb (qcow2 payload, 48 MiB)' % what, g.tail())
    guest_reads(g, 'vda', what + ', vda', pa_plain)
    guest_reads(g, 'vdb', what + ', vdb', pb_plain)
    check(g.wait(r'wrote vda %d %d 0x5c' % (W_OFF, W_LEN)) and
          g.wait(r'wrote vdb %d %d 0x3c' % (W_OFF, W_LEN)),
          '%s: the guest writes a pattern on each disk' % what, g.tail())
    powered_off(g, what)
    read_back(h, pa, False, PASS, [(0x5c, W_OFF, W_LEN), (0x5a, Plain.PAT_OFF, Plain.PAT_LEN)],
              "%s: qemu-io reads vda's pattern and plaintext through payload A's detached "
              "spec" % what)
    read_back(h, pb, True, PASS, [(0x3c, W_OFF, W_LEN), (0xa7, Plain.PAT_OFF, Plain.PAT_LEN)],
              "%s: qemu-io reads vdb's pattern and plaintext through payload B's detached "
              "spec" % what)
    no_plaintext(pa, '%s: the raw payload A' % what, [pa_plain, pb_plain])
    no_plaintext(pb, '%s: the qcow2 payload B' % what, [pa_plain, pb_plain])
    check(sha256(h) == hsum, '%s: the header file is unchanged' % what)


def shared_hotplug(d):
    """Disk A on the command line, disk B added and removed over QMP."""
    what = 'shared header hotplug'
    pa_plain, pb_plain = Plain(d, 't7ha', 0x5a), Plain(d, 't7hb', 0xa7)
    files = make_shared(d, 't7h', what, pa_plain, pb_plain)
    if not files:
        return
    h, pa, pb = files
    hdr, a, b = shared_blockdevs(h, pa, pb, 'sec-a', 'sec-b')
    args = ['-object', 'secret,id=sec-a,data=' + PASS]
    for x in hdr + a:
        args += ['-blockdev', json.dumps(x)]
    args += ['-device', 'virtio-blk-pci,drive=%s,id=virtio-disk0' % LUKS_A]
    # vdb comes, goes and comes back; vda is read each time.
    g = Guest(d, 't7h', ['list'] + pa_plain.reads('vda') + ['wait:vdb:50', 'list'] +
              pb_plain.reads('vdb') + pa_plain.reads('vda') + ['gone:vdb:50', 'wait:vdb:50'] +
              pa_plain.reads('vda') + pb_plain.reads('vdb') + WRITES + ['poweroff'], args)
    check(g.wait(r'disks vda') and g.wait(r'disk vda %d' % DISK),
          '%s: the guest boots with vda only' % what, g.tail())
    guest_reads(g, 'vda', what + ', vda', pa_plain)
    for sid, data in [('sec-b', PASS), ('sec-new', NEW_PASS)]:
        g.ok('%s: object-add secret %s' % (what, sid),
             'object-add', **{'qom-type': 'secret', 'id': sid, 'data': data})
    mark = len(g.lines())
    for x in b:
        g.ok('%s: blockdev-add %s%s' % (
            what, x['node-name'], ' (header: the existing %s)' % HDR if 'header' in x else ''),
            'blockdev-add', **x)
    g.ok('%s: device_add virtio-disk1' % what,
         'device_add', driver='virtio-blk-pci', drive=LUKS_B, id='virtio-disk1')
    shared_users_ok(g, [LUKS_A, LUKS_B], what)
    check(g.wait(r'appeared vdb', since=mark) and g.wait(r'disk vdb %d' % DISK_B, since=mark),
          '%s: the guest sees vdb of 48 MiB' % what, g.tail())
    guest_reads(g, 'vdb', what + ', vdb', pb_plain, since=mark)
    guest_reads(g, 'vda', what + ', vda with vdb plugged', pa_plain, since=mark)

    # No key update while another luks node uses the header.
    hsum = sha256(h)
    for node, other in [(LUKS_A, LUKS_B), (LUKS_B, LUKS_A)]:
        cls, why = error_of(g.qmp('x-blockdev-amend', **amend_add_key('amend-' + node, node)))
        check(cls == 'GenericError' and 'Cannot update the keys of detached LUKS header' in why
              and 'Permission conflict' in why and other in why,
              '%s: x-blockdev-amend on %s fails while %s shares the header, naming the '
              'permission conflict' % (what, node, other), '%s: %s' % (cls, why))
    check(g.command('query-jobs') == [] and status(g) == 'running'
          and sha256(h) == hsum, '%s: no job left, the header file unchanged, the VM keeps '
          'running' % what)
    shared_users_ok(g, [LUKS_A, LUKS_B], what + ', after the failed amend')

    # Unplug disk B; disk A stays.
    g.ok('%s: device_del virtio-disk1' % what, 'device_del', id='virtio-disk1')
    check(g.event('DEVICE_DELETED', 30, device='virtio-disk1'),
          '%s: DEVICE_DELETED for virtio-disk1' % what, json.dumps(g.vm.get_qmp_events()))
    check(g.wait(r'gone vdb', since=mark), '%s: vdb is gone from the guest' % what, g.tail())
    for x in reversed(b):
        g.ok('%s: blockdev-del %s' % (what, x['node-name']),
             'blockdev-del', **{'node-name': x['node-name']})
    cls, why = error_of(g.qmp('blockdev-del', **{'node-name': HDR}))
    check(cls == 'GenericError' and why == 'Block device %s is in use' % HDR,
          '%s: blockdev-del of the header node while %s uses it fails: "in use"'
          % (what, LUKS_A), '%s: %s' % (cls, why))
    shared_users_ok(g, [LUKS_A], what + ', after the unplug')

    # With a single user, the key update works.
    if g.ok('%s: x-blockdev-amend on %s, now the only user, adds a key slot (secret sec-new)'
            % (what, LUKS_A), 'x-blockdev-amend', **amend_add_key('amend1', LUKS_A)):
        e = g.event('JOB_STATUS_CHANGE', 30, id='amend1', status='concluded')
        jobs = [j for j in g.command('query-jobs') if j['id'] == 'amend1']
        check(e and jobs and 'error' not in jobs[0],
              '%s: the amend job concludes without error' % what, json.dumps(jobs))
        g.ok('%s: job-dismiss' % what, 'job-dismiss', id='amend1')
        check(sha256(h) != hsum, '%s: the header file changed' % what)
    shared_users_ok(g, [LUKS_A], what + ', after the amend')

    # Disk B again, opened with the new key slot; vda still reads as before.
    mark = len(g.lines())
    b[-1]['key-secret'] = 'sec-new'
    for x in b:
        g.ok('%s: blockdev-add %s again%s' % (
            what, x['node-name'], ' (new secret)' if 'header' in x else ''), 'blockdev-add', **x)
    g.ok('%s: device_add virtio-disk2' % what,
         'device_add', driver='virtio-blk-pci', drive=LUKS_B, id='virtio-disk2')
    check(g.wait(r'appeared vdb', since=mark), '%s: the guest sees vdb again' % what, g.tail())
    guest_reads(g, 'vda', what + ', vda after the unplug and the amend', pa_plain, since=mark)
    guest_reads(g, 'vdb', what + ', vdb opened with the new key slot', pb_plain, since=mark)
    check(g.wait(r'wrote vda %d %d 0x5c' % (W_OFF, W_LEN), since=mark) and
          g.wait(r'wrote vdb %d %d 0x3c' % (W_OFF, W_LEN), since=mark),
          '%s: the guest writes a pattern on each disk' % what, g.tail())
    powered_off(g, what)
    read_back(h, pa, False, NEW_PASS, [(0x5c, W_OFF, W_LEN), (0x5a, Plain.PAT_OFF,
                                                              Plain.PAT_LEN)],
              "%s: qemu-io with the new secret reads vda's pattern and plaintext through "
              "payload A's detached spec" % what)
    read_back(h, pb, True, PASS, [(0x3c, W_OFF, W_LEN), (0xa7, Plain.PAT_OFF, Plain.PAT_LEN)],
              "%s: qemu-io with the old secret reads vdb's pattern and plaintext through "
              "payload B's detached spec" % what)
    no_plaintext(pa, '%s: the raw payload A' % what, [pa_plain, pb_plain])
    no_plaintext(pb, '%s: the qcow2 payload B' % what, [pa_plain, pb_plain])
    r = qemu_img('check', pb)
    check(r.ok and 'No errors were found' in r.out,
          '%s: qemu-img check on the qcow2 payload is clean' % what, r)


# --- LUKS2 ----------------------------------------------------------------------
L2_W_OFF, L2_W_LEN = 16 * MiB, MiB     # where the guest writes


def make_luks2(d, name, what, plain):
    """A raw payload of 64 MiB and a LUKS2 detached header for it made by
    cryptsetup (4096-byte sectors, Argon2id with small costs); plain is
    written into the payload by tests/lib/luks2.py's own encryption, keyed
    by its own unlock.  (header, payload, luks2.Header, volume key), or
    None."""
    h = os.path.join(d, name + '-header.img')
    p = os.path.join(d, name + '-payload.raw')
    with open(p, 'wb') as f:
        f.truncate(DISK)
    r = run(['cryptsetup', '--batch-mode', 'luksFormat', '--type', 'luks2', '--pbkdf', 'argon2id',
             '--pbkdf-memory', '32', '--pbkdf-force-iterations', '4', '--sector-size', '4096',
             '--key-file', '-', '--header', h, p], stdin=PASS.encode())
    hdr = key = ss = None
    if r.ok:
        try:
            hdr = luks2.Header(h)
            key = luks2.unlock(hdr, PASS.encode())[1]
            ss = hdr.segment()['sector_size']
            with open(p, 'r+b') as f:
                for off, data in [(0, plain.random),
                                  (plain.PAT_OFF, bytes([plain.pattern]) * plain.PAT_LEN)]:
                    f.seek(off)
                    f.write(luks2.payload_crypt(hdr, key, data, off // ss, True))
        except (luks2.LUKS2Error, OSError, KeyError) as e:
            r.out += '\nluks2.py: %s' % e
            key = None
    if check(r.ok and key and ss == 4096, '%s: cryptsetup luksFormat --type luks2 --header '
             '(Argon2id, 4096-byte sectors); the plaintext written into the raw payload by '
             "luks2.py's own encryption" % what, r):
        return h, p, hdr, key
    return None


def luks2_decrypts(p, hdr, key, off, want):
    """Whether luks2.py decrypts the payload at off to the bytes want."""
    with open(p, 'rb') as f:
        f.seek(off)
        data = f.read(len(want))
    ss = hdr.segment()['sector_size']
    return luks2.payload_crypt(hdr, key, data, off // ss, False) == want


def luks2_after(what, h, p, hdr, key, plain, byte):
    """What a guest wrote (byte at L2_W_OFF) and the plaintext, as luks2.py
    decrypts them; cryptsetup still accepts the passphrase."""
    check(luks2_decrypts(p, hdr, key, L2_W_OFF, bytes([byte]) * L2_W_LEN) and
          luks2_decrypts(p, hdr, key, 0, plain.random),
          "%s: luks2.py decrypts the guest's 0x%x pattern and the plaintext from the payload"
          % (what, byte))
    r = run(['cryptsetup', 'open', '--test-passphrase', '--header', h, p, '--key-file', '-'],
            stdin=PASS.encode())
    check(r.ok, what + ': cryptsetup open --test-passphrase still accepts the passphrase', r)
    # cryptsetup's own decryption, in user space, of copies
    hc, pc = h + '.cs', p + '.cs'
    shutil.copy(h, hc)
    shutil.copy(p, pc)
    r = run(['cryptsetup', '--batch-mode', 'reencrypt', '--decrypt', '--force-offline-reencrypt',
             '--header', hc, pc, '--key-file', '-'], stdin=PASS.encode(), timeout=120)
    data = read(pc) if r.ok else b''
    check(r.ok and data[:MiB] == plain.random and
          data[L2_W_OFF:L2_W_OFF + L2_W_LEN] == bytes([byte]) * L2_W_LEN,
          "%s: cryptsetup's own decryption (reencrypt --decrypt) reads the plaintext and "
          "the guest's 0x%x pattern too" % (what, byte), r)
    remove(pc)


@guest_test(150)
def luks2_header(d):
    """A cryptsetup LUKS2 detached header: the README's command line, then hotplugged."""
    luks2_cmdline(d)
    luks2_hotplug(d)


def luks2_cmdline(d):
    """The README's LUKS2 VM command line."""
    what = 'LUKS2 README command line'
    plain = Plain(d, 't9', 0x5a)
    made = make_luks2(d, 't9', what, plain)
    if not made:
        return
    h, p, hdr, key = made
    args = [x for opt, value in readme_luks2_vm()
            for x in (opt, fill(value, h, p, README_LUKS2_PATHS))]
    boot_read_write(d, 't9', what, plain, h, p, args, qcow2=False)
    luks2_after(what, h, p, hdr, key, plain, 0x5c)


def luks2_hotplug(d):
    """The same disk added over QMP, read, written, removed."""
    what = 'LUKS2 hotplug'
    plain = Plain(d, 't9h', 0xa7)
    made = make_luks2(d, 't9h', what, plain)
    if not made:
        return
    h, p, hdr, key = made
    hsum = sha256(h)
    g = Guest(d, 't9h', ['list', 'wait:vda:50'] + plain.reads('vda') +
              ['write:vda:%d:%d:0x3c' % (L2_W_OFF, L2_W_LEN), 'gone:vda:50', 'list', 'sleep:60'])
    check(g.wait(r'disks\s*') and status(g) == 'running',
          what + ': the guest boots with no disk', g.tail())
    nodes0 = node_names(g)
    # The README's options, as QMP commands
    opts = [(o, json.loads(fill(v, h, p, README_LUKS2_PATHS))) for o, v in readme_luks2_vm()]
    cmd = {'-object': 'object-add', '-blockdev': 'blockdev-add', '-device': 'device_add'}
    for o, a in opts:
        g.ok('%s: %s %s' % (what, cmd[o], a.get('node-name') or a['id']), cmd[o], **a)
    luks_node = [a for o, a in opts if a.get('driver') == 'luks'][0]['node-name']
    dev = [a for o, a in opts if o == '-device'][0]['id']
    info = [x['image'] for x in g.command('query-named-block-nodes')
            if x['node-name'] == luks_node]
    data = info[0].get('format-specific', {}).get('data', {}) if info else {}
    seg = data.get('__org.example_luks2', {}).get('segment', {})
    check(info and info[0]['virtual-size'] == DISK and data.get('detached-header') is True and
          seg.get('sector-size') == 4096 and seg.get('offset') == 0,
          what + ': query-named-block-nodes shows the luks node: 64 MiB, detached-header true, '
          'a LUKS2 segment at offset 0 with 4096-byte sectors', json.dumps(info))
    check(g.wait(r'appeared vda'), what + ': the guest sees the new disk', g.tail())
    guest_reads(g, 'vda', what, plain)
    check(g.wait(r'wrote vda %d %d 0x3c' % (L2_W_OFF, L2_W_LEN)),
          what + ': the guest writes a 0x3c pattern', g.tail())
    g.ok(what + ': device_del ' + dev, 'device_del', id=dev)
    check(g.event('DEVICE_DELETED', 30, device=dev),
          what + ': DEVICE_DELETED for ' + dev, json.dumps(g.vm.get_qmp_events()))
    check(g.wait(r'gone vda'), what + ': the disk is gone from the guest', g.tail())
    for o, a in reversed(opts):
        if o == '-blockdev':
            g.ok(what + ': blockdev-del ' + a['node-name'],
                 'blockdev-del', **{'node-name': a['node-name']})
        elif o == '-object':
            g.ok(what + ': object-del ' + a['id'], 'object-del', id=a['id'])
    check(node_names(g) == nodes0, what + ': no block node left', 'nodes: %s' % node_names(g))
    g.command('quit')
    check(g.exited(20) is not None, what + ': the VM quits when asked', g.tail())
    check(sha256(h) == hsum, what + ': the header file is unchanged')
    no_plaintext(p, what + ': the payload', [plain])
    luks2_after(what, h, p, hdr, key, plain, 0x3c)


# --- main -----------------------------------------------------------------------
class Deadline(Exception):
    pass


def on_alarm(*_):
    raise Deadline('the test ran out of time')


def main(want):
    global KERNEL, INITRD
    tmp = scratch('guest-e2e.')
    os.chmod(tmp, 0o755)     # the libvirt test runs its daemon as the user nobody
    r = run(['bash', os.path.join(TOP, 'tests', 'guest', 'build-guest.sh')], timeout=900)
    paths = r.out.strip().splitlines()[-2:] if r.ok else []
    if not check(len(paths) == 2 and all(os.path.exists(x) for x in paths),
                 'build the test guest (tests/guest/build-guest.sh)', r):
        return
    KERNEL, INITRD = paths
    unknown = set(want) - {fn.__name__ for fn, _ in TESTS}
    check(not unknown, 'the tests asked for exist', 'unknown: %s' % sorted(unknown))
    signal.signal(signal.SIGALRM, on_alarm)
    for fn, limit in TESTS:
        if want and fn.__name__ not in want:
            continue
        if not want and fn.__name__ in BY_NAME_ONLY:
            continue
        d = os.path.join(tmp, fn.__name__)
        os.makedirs(d)
        os.chmod(d, 0o755)
        t = time.time()
        signal.alarm(limit)
        try:
            fn(d)
        except Exception as e:          # noqa: BLE001 (a deadline, QMP trouble, ...)
            msg = str(e).strip().split('\n')
            check(False, '%s: aborted: %s: %s' % (fn.__doc__.split('\n')[0], type(e).__name__,
                                                  msg[0]), '\n'.join(msg[1:]))
        finally:
            signal.alarm(0)
            stop_all()
            while procs:
                stop(procs.pop())
        print('# %s (%s) took %.0f s' % (fn.__name__, fn.__doc__.split('\n')[0], time.time() - t))


KERNEL = INITRD = None
if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    finally:
        stop_all()
        while procs:
            stop(procs.pop())
    tap.done()
