#!/usr/bin/python3
"""The detached-header commands as users type them (the README's and the
docs' walkthrough), run with the binaries of the build under test, their
human output checked.  Prints TAP."""

import os
import pwd
import re

from proc import (QEMU_IMG, QEMU_IO, MiB, import_iotests, qemu_img, qemu_io, read, run, scratch,
                  sha256, time_limit)
from specs import PROBE_PAYLOAD, qcow2, refuses, secret, spec
from tap import check, tap

# What the commands say.  The series may reword these: change them here.
EXPECT = {
    # the luks node put straight on a qcow2 file, as its payload
    'qcow2-payload': 'holds a qcow2 image',
    'qcow2-fix': '"file": {"driver": "qcow2", "file": ...}',
    'resize-header-alone': 'Cannot resize a detached LUKS header opened without its payload',
    'wrong-passphrase': 'Invalid password, cannot unlock any keyslot',
    'not-luks': 'Volume is not in LUKS format',
    'truncated': 'Encryption header is truncated',
    'lock': re.compile(r'Failed to get .*"write" lock'),
}
SEC = secret(data='abc123')
QCOW2 = qcow2('test-payload.qcow2')
RAW = 'test-payload.raw'
HEADER_ALONE = ['--image-opts', 'driver=luks,key-secret=sec0,file.filename=test-header.img']


def vol(payload, header='test-header.img', **extra):
    return spec(payload, header, **extra)


iotests = import_iotests()


class Holder(iotests.QemuIoInteractive):
    """qemu-io in interactive mode, its commands from a pipe: a process
    that holds an image open for as long as a test needs, and answers.
    This is iotests.QemuIoInteractive with what it lacks here: a time
    limit on each wait (it waits for ever), an answer of None when
    qemu-io is gone (it fails an assertion), whether qemu-io still runs
    and its exit status, and a transcript (out) for the diagnostics.
    The constructor raises ValueError if qemu-io gave no prompt (it
    exited, its output the message), TimeoutError if none came in time."""

    def __init__(self, *args, timeout=60):
        self.out = ''
        try:
            with time_limit(timeout):
                super().__init__(*args)
        except TimeoutError:
            self._p.kill()
            self._p.wait()
            raise

    def ask(self, cmd, timeout=30):
        """cmd's output, or None if none came in time or qemu-io exited."""
        try:
            with time_limit(timeout):
                answer = self.cmd(cmd)
        except (AssertionError, OSError, TimeoutError) as e:
            answer = None
            self.out += 'qemu-io> %s\n[no answer: %s %s]\n' % (cmd, type(e).__name__, e)
        else:
            self.out += 'qemu-io> %s\n%s' % (cmd, answer)
        return answer

    def alive(self):
        return self._p.poll() is None

    def quit(self, timeout=30):
        """close(): its exit status, or None if it had to be killed."""
        try:
            with time_limit(timeout):
                self.close()
        except (OSError, ValueError, TimeoutError):    # its pipe is gone, or no exit
            if self._p.poll() is None:
                self._p.kill()
                self._p.wait()
                return None
        return self._p.wait()


scratch('seed-commands.')

# 1. Create, as written (the default PBKDF time, as users get it).
r = qemu_img('create', '--object', SEC, '-f', 'luks',
             '-o', 'cipher-alg=aes-256,cipher-mode=xts', '-o', 'key-secret=sec0',
             '-o', 'detached-header=true', 'test-header.img')
check(r.ok, 'qemu-img create -o detached-header=true without a size', r)
size = os.path.getsize('test-header.img') if os.path.exists('test-header.img') else 0
check(1000000 < size < 4000000, 'the header file exists and is about 2 MiB (%d bytes)' % size)
r = qemu_img('create', '-f', 'qcow2', 'test-payload.qcow2', '200G')
check(r.ok, 'qemu-img create the qcow2 payload', r)
# As upstream QEMU does, a size given with detached-header=true is ignored.
r = qemu_img('create', '--object', SEC, '-f', 'luks', '-o', 'key-secret=sec0,iter-time=10',
             '-o', 'detached-header=true', 'sized-header.img', '1G')
check(r.ok and os.path.getsize('sized-header.img') == size,
      'qemu-img create -o detached-header=true with a size: accepted, the size ignored', r)

# 2. The info call naming the qcow2 file directly: refused, fix named.
r = qemu_img('info', vol('test-payload.qcow2'))
check(r.refused, 'info on the qcow2 file\'s bytes fails', r)
check(EXPECT['qcow2-payload'] in r.out, 'and says it is a qcow2 image', r.out)
check(EXPECT['qcow2-fix'] in r.out, 'and names the fix', r.out)
check('"%s": false' % PROBE_PAYLOAD in r.out, 'and names the option that turns the check off',
      r.out)
check('virtual size:' not in r.out, 'and never reports the file length as the size')
r = qemu_img('info', vol('test-payload.qcow2', **{PROBE_PAYLOAD: False}))
qsize = -(-os.path.getsize('test-payload.qcow2') // 512) * 512    # whole sectors
check(r.ok and '(%d bytes)' % qsize in r.out,
      'with "%s": false the same file opens, its length (%d) as the size'
      % (PROBE_PAYLOAD, qsize), r)

# 3. With a qcow2 format node: 200 GiB, detached header.
r = qemu_img('info', vol(QCOW2, key=None))
for text, desc in [('virtual size: 200 GiB (214748364800 bytes)', 'virtual size is 200 GiB'),
                   ('detached header: true', 'detached header: true'),
                   ('payload offset: 0', 'payload offset: 0'),
                   ('image: json:{"header": {"driver": "file", "filename": "test-header.img"}',
                    "the image's name includes the header (json: filename)")]:
    check(r.ok and text in r.out, 'info through a qcow2 node: ' + desc, r)

# 4. qemu-io through the layering: qcow2 and raw payloads, reopened.
with open(RAW, 'wb') as f:
    f.truncate(64 * MiB)
for name, payload in [('qcow2', QCOW2), ('raw', RAW)]:
    r = qemu_io('--object', SEC, '-c', 'write -P 0xa5 0 1M', '-c', 'write -P 0x5a 32M 64k',
                vol(payload))
    check(r.ok and r.out.count('wrote ') == 2, '%s payload: qemu-io writes' % name, r)
    r = qemu_io('--object', SEC, '-c', 'read -P 0xa5 0 1M', '-c', 'read -P 0x5a 32M 64k',
                vol(payload))
    check(r.ok and r.out.count('read ') == 2 and 'Pattern verification failed' not in r.out,
          '%s payload: reopened, the data reads back' % name, r)
with open('control.raw', 'wb') as f:
    f.truncate(MiB)
qemu_io('-f', 'raw', '-c', 'write -P 0xa5 0 64k', 'control.raw')
check(b'\xa5' * 512 in read('control.raw'), '(control) plaintext written unencrypted is found')
data = read(RAW)
check(b'\xa5' * 512 not in data and b'\x5a' * 512 not in data,
      'the raw payload holds no plaintext')
check(b'LUKS\xba\xbe' not in data, 'the raw payload holds no LUKS magic')
r = qemu_img('check', 'test-payload.qcow2')
check('No errors were found on the image.' in r.out, 'the qcow2 payload stays consistent', r)

# 5. The header alone: inspectable, empty, not writable.
r = qemu_img('info', 'test-header.img')
check('detached header: true' in r.out, 'qemu-img info on the header alone', r)
check('virtual size: 0 B (0 bytes)' in r.out, 'the header alone has no size', r)
hsum = sha256('test-header.img')
# "length" first: the open itself must succeed, so that the write is what
# fails.  The block layer stops the write (beyond the end of an empty
# volume) before the luks driver sees it.
r = qemu_io('--object', SEC, '-c', 'length', '-c', 'write 0 512', *HEADER_ALONE)
check(r.refused and '0 bytes' in r.out and 'write failed' in r.out,
      'writing to the header alone: it opens (length 0), the write fails', r)
check(sha256('test-header.img') == hsum, 'and leaves it unchanged')
# Resizing reaches the luks driver's own refusal.
r = qemu_img('resize', '--object', SEC, *HEADER_ALONE, '+1M')
check(r.refused and EXPECT['resize-header-alone'] in r.out,
      'resizing the header alone fails, saying why', r)
check(sha256('test-header.img') == hsum, 'and leaves it unchanged')


# Held open read-write on its own, the header takes no write lock, so a
# volume that uses it as its header still opens.  The holder is qemu-io
# reading commands from a pipe: its answer to "length" says it is up.
def second_open(holder_args, volume, what):
    """Start a holder, then open volume read-write in another qemu-io.
    Checks that the holder was up before and still is after, and quits
    with status 0; returns the second open's result."""
    try:
        h = Holder(*holder_args)
    except (ValueError, TimeoutError) as e:
        h, why = None, 'qemu-io %s: no prompt: %s: %s' % (holder_args, type(e).__name__, e)
    answer = h.ask('length', timeout=60) if h else None
    check(answer and re.match(r'[0-9.]+ (bytes|[KMG]iB)$', answer.strip()) and h.alive(),
          '%s: the holder is up (it answered "length": %s)' % (what, (answer or '').strip()),
          h.out if h else why)
    r = qemu_io('--object', SEC, '-c', 'read -P 0xa5 0 64k', volume)
    check(h and h.alive() and h.ask('length') is not None,
          '%s: the holder is still there after the second open' % what, h.out if h else why)
    rc = h.quit() if h else None
    check(rc == 0, '%s: the holder quits with exit status 0 (%s)' % (what, rc),
          h.out if h else why)
    return r


r = second_open(['--object', SEC] + HEADER_ALONE, vol(RAW), 'header held alone')
check(r.ok and 'Pattern verification failed' not in r.out and 'read 65536/65536' in r.out,
      'header held alone: the volume using it as header still opens and reads', r)
# Controls: holders that take locks do make that open fail.  A writer of
# the header file, as plain raw:
r = second_open(['-f', 'raw', 'test-header.img'], vol(RAW), 'header file held by a writer')
check(r.refused and EXPECT['lock'].search(r.out) and '[test-header.img]' in r.out,
      'header file held by a writer (control): the second open fails on its lock', r)
# The whole volume, opened read-write (with the qcow2 payload: qemu-io
# shares every permission of its own, and so does a raw payload under
# luks; the qcow2 driver does not share writes to its file).
r = second_open(['--object', SEC, vol(QCOW2)], vol(QCOW2), 'whole volume held')
check(r.refused and EXPECT['lock'].search(r.out) and '[test-payload.qcow2]' in r.out,
      'whole volume held (control): a second read-write open of it fails on a lock', r)

# 6. Bad input: clear errors, nothing written.
with open('test-header.img', 'rb') as f:
    good = f.read()
with open('short-header.img', 'wb') as f:
    f.write(good[:4096])
with open('random-header.img', 'wb') as f:
    f.write(os.urandom(2 * MiB))
files = ['test-header.img', RAW, 'short-header.img', 'random-header.img']
for desc, text, key, header in [
        ('wrong passphrase', EXPECT['wrong-passphrase'], 'wrong', 'test-header.img'),
        ('missing header file', "Could not open 'nonexistent.img'", 'abc123', 'nonexistent.img'),
        ('header that is not LUKS', EXPECT['not-luks'], 'abc123', 'random-header.img'),
        ('truncated header', EXPECT['truncated'], 'abc123', 'short-header.img')]:
    refuses(desc, [QEMU_IO, '--object', secret(data=key), '-c', 'write -P 0xee 0 4k',
                   vol(RAW, header)], text, files)

# 7. A protected header: the QEMU process may read it but not write it
# (mode 0444 for an unprivileged user, as on a read-only NFS export).
# It opens with no extra option; amending its keys fails, naming it.
AS_NOBODY = ['setpriv', '--reuid=nobody', '--regid=nogroup', '--clear-groups']
os.chmod('.', 0o711)                # the scratch directory is 0700
os.mkdir('protected')
os.chmod('protected', 0o755)
r = qemu_img('create', '--object', SEC, '-f', 'luks', '-o', 'key-secret=sec0,iter-time=10',
             '-o', 'detached-header=true', 'protected/hdr.img')
with open('protected/data.raw', 'wb') as f:
    f.truncate(4 * MiB)
os.chmod('protected/hdr.img', 0o444)
os.chown('protected/data.raw', pwd.getpwnam('nobody').pw_uid, -1)
PROTECTED = vol('protected/data.raw', 'protected/hdr.img')
hsum = sha256('protected/hdr.img')
r = run(AS_NOBODY + [QEMU_IO, '--object', SEC, '-c', 'write -P 0x3c 0 64k',
                     '-c', 'read -P 0x3c 0 64k', PROTECTED])
check(r.ok and 'Pattern verification failed' not in r.out and 'read 65536/65536' in r.out,
      'protected header (0444, unprivileged process): the volume opens, writes and reads back',
      r)
refuses('protected header: amending its keys',
        AS_NOBODY + [QEMU_IMG, 'amend', '--object', SEC, '--object', secret('sec1', 'def456'),
                     '-o', 'state=active,new-secret=sec1,iter-time=10', PROTECTED],
        "Cannot update the keys of detached LUKS header 'protected/hdr.img'",
        ['protected/hdr.img'])
check(sha256('protected/hdr.img') == hsum, 'protected header: left unchanged')
# Control: the same header, writable by that user, takes the new key.
os.chown('protected/hdr.img', pwd.getpwnam('nobody').pw_uid, -1)
os.chmod('protected/hdr.img', 0o644)
r = run(AS_NOBODY + [QEMU_IMG, 'amend', '--object', SEC, '--object', secret('sec1', 'def456'),
                     '-o', 'state=active,new-secret=sec1,iter-time=10', PROTECTED])
r2 = run(AS_NOBODY + [QEMU_IO, '--object', secret(data='def456'), '-c', 'write -P 0x3d 0 64k',
                      '-c', 'read -P 0x3d 0 64k', PROTECTED])
check(r.ok and r2.ok and 'Pattern verification failed' not in r2.out,
      'writable header (control): amend adds a key, which then unlocks the volume', '%s\n%s'
      % (r, r2))

tap.done()
