"""Helpers shared by this repository's suites (tests/*.py).

Run the suites with Debian's /usr/bin/python3 (python3-cryptography is
used by tests/lib/luks1.py).  Nothing here needs anything else.

  TAP            numbered "ok N - ..." / "not ok N - ..." lines, "#"
                 diagnostics, and the plan "1..N" at the end (done())
  run()          a command with a time limit, output and status captured
  scratch()      a temporary directory, removed at exit
  sha256()       of a file ("absent" when there is none)
  luks(), spec() luks json: specs with a detached or attached header
  qemu_img(), qemu_io()   the binaries of the build under test
  read_volume()  the whole plaintext of a volume, via qemu-img convert,
                 into a file that is removed first
  refuses()      "must fail, saying this, leaving these files
                 byte-identical", as three TAP lines
  QemuIoShell    qemu-io in interactive mode: a holder that answers
  python_qemu()  QEMU's own python/ (qemu.machine, qemu.qmp) on sys.path
  readme_blocks() the README's ```sh blocks and their readme-test markers
  PROBE_PAYLOAD  the name of the luks option that turns the payload probe off

The build under test is found as scripts/lib.sh finds it: QEMU_LUKS_BUILD
(default build/ of this checkout) holds qemu/ (the source tree) and obj/.
"""

import atexit
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get('QEMU_LUKS_BUILD') or os.path.join(TOP, 'build')
SRC = os.path.join(BUILD, 'qemu')
OBJ = os.path.join(BUILD, 'obj')
QEMU_IMG = os.path.join(OBJ, 'qemu-img')
QEMU_IO = os.path.join(OBJ, 'qemu-io')
QEMU_SYSTEM = os.path.join(OBJ, 'qemu-system-x86_64')
QSD = os.path.join(OBJ, 'storage-daemon', 'qemu-storage-daemon')
PYTHON = '/usr/bin/python3'
MiB = 1 << 20

# The luks blockdev option that turns off the payload probe.  The series
# is renaming it (downstream QAPI names carry a vendor prefix); this is
# the one place that names it.
PROBE_PAYLOAD = '__org.example_probe-payload'

# Commands see the binaries under test first, and messages in English.
ENV = dict(os.environ, PATH=OBJ + os.pathsep + os.environ.get('PATH', '/usr/bin:/bin'),
           LC_ALL='C')

sys.stdout.reconfigure(line_buffering=True)


# --- TAP ------------------------------------------------------------------
class TAP:
    """Numbered TAP lines.  check() returns the condition, so a caller can
    skip what depends on a failed step."""

    def __init__(self):
        self.n = 0
        self.failed = 0

    @staticmethod
    def diag(text, tail=40):
        """Print text as '#' lines (its last `tail` lines)."""
        lines = str(text).rstrip('\n').splitlines()
        for line in lines[-tail:]:
            print('#   ' + line)

    def check(self, cond, desc, why=''):
        self.n += 1
        cond = bool(cond)
        print('%s %d - %s' % ('ok' if cond else 'not ok', self.n, desc))
        if not cond:
            self.failed += 1
            if why:
                self.diag(why)
        return cond

    def skip(self, desc, reason):
        self.n += 1
        print('ok %d - %s # SKIP %s' % (self.n, desc, reason))

    def done(self):
        """The plan, then exit: non-zero if a test failed or none ran."""
        print('1..%d' % self.n)
        sys.exit(1 if self.failed or not self.n else 0)


tap = TAP()
check, diag, skip = tap.check, tap.diag, tap.skip


# --- commands ---------------------------------------------------------------
class Result:
    """A finished command: rc (None if it timed out, negative if killed by
    a signal) and out (stdout and stderr together)."""

    def __init__(self, args, rc, out):
        self.args, self.rc, self.out = args, rc, out

    @property
    def ok(self):
        return self.rc == 0

    @property
    def refused(self):
        """Failed by itself: a non-zero exit, no signal, no time limit."""
        return self.rc is not None and self.rc > 0

    def __str__(self):
        return '$ %s\n[exit status %s]\n%s' % (' '.join(map(str, self.args)),
                                             'timeout' if self.rc is None
                                             else self.rc, self.out)


def run(args, timeout=60, env=None, cwd=None, stdin=None):
    """Run args (a list) with a time limit; never raises for the command's
    failure.  stdin: bytes to feed, or None for /dev/null."""
    args = [str(a) for a in args]
    try:
        r = subprocess.run(args, input=stdin,
                           stdin=None if stdin is not None else subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=env or ENV, cwd=cwd, timeout=timeout)
        return Result(args, r.returncode, r.stdout.decode(errors='replace'))
    except subprocess.TimeoutExpired as e:
        out = (e.output or b'').decode(errors='replace')
        return Result(args, None, out + '\n[killed after %d s]' % timeout)
    except OSError as e:
        return Result(args, 127, str(e))


def qemu_img(*args, timeout=60, **kw):
    return run([QEMU_IMG] + list(args), timeout, **kw)


def qemu_io(*args, timeout=60, **kw):
    return run([QEMU_IO] + list(args), timeout, **kw)


def secret(sid='sec0', data=None, file=None):
    """A --object secret argument."""
    return 'secret,id=%s,%s' % (sid, 'file=' + file if file else 'data=' + data)


# --- files ------------------------------------------------------------------
def scratch(prefix='luks-test.'):
    """A fresh directory under /tmp, removed when the suite exits; the
    suite's working directory."""
    d = tempfile.mkdtemp(prefix=prefix)
    atexit.register(lambda: (os.chdir('/'), shutil.rmtree(d, ignore_errors=True)))
    os.chdir(d)
    return d


def sha256(path):
    try:
        with open(path, 'rb') as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return 'absent'


def sums(paths):
    return {p: sha256(p) for p in paths}


def read(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        return None


def text(path):
    """A file's content as text ('' when there is none)."""
    data = read(path)
    return data.decode(errors='replace') if data is not None else ''


def write(path, data):
    with open(path, 'wb') as f:
        f.write(data)


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- luks json: specs -------------------------------------------------------
def node(x):
    """A file name as {"filename": x}; a dict as it is."""
    return x if isinstance(x, dict) else {'filename': x}


def luks(payload, header=None, key='sec0', **extra):
    """The options of a luks node over payload, with header if given
    (key None: no key-secret, for info)."""
    d = {'driver': 'luks', 'file': node(payload)}
    if key:
        d['key-secret'] = key
    if header is not None:
        d['header'] = node(header)
    d.update(extra)
    return d


def spec(payload, header=None, key='sec0', **extra):
    """A json: filename for a luks node (see luks())."""
    return 'json:' + json.dumps(luks(payload, header, key, **extra))


def qcow2(path):
    """A qcow2 format node over a file."""
    return {'driver': 'qcow2', 'file': {'filename': path}}


def read_volume(keyfile, volume_spec, out):
    """The whole plaintext of a volume into out, which is removed first so
    that a failed read never leaves an earlier step's data behind."""
    remove(out)
    return qemu_img('convert', '-O', 'raw', '--object', secret(file=keyfile),
                    volume_spec, out)


def reads_back(desc, keyfile, volume_spec, want_path, out='out.raw'):
    """One TAP line: the volume reads back as the file want_path."""
    r = read_volume(keyfile, volume_spec, out)
    got = read(out) if r.ok else None
    return check(r.ok and got == read(want_path), desc,
                 str(r) if not r.ok else
                 'the plaintext read differs from %s (%s bytes read)'
                 % (want_path, len(got) if got is not None else 'no'))


# --- refusals ---------------------------------------------------------------
def has_text(out, text):
    """text is a plain string, or a compiled regular expression."""
    if isinstance(text, re.Pattern):
        return text.search(out) is not None
    return text in out


def refuses(desc, args, text, files, absent=(), timeout=60, **kw):
    """Three TAP lines: args fails by itself (exit status 1..., no signal,
    no time limit), its output has text and none of absent, and every
    path in files is byte-identical afterwards (or still absent)."""
    before = sums(files)
    r = run(args, timeout, **kw)
    after = sums(files)
    check(r.refused, '%s: refused, exit status %s (no crash, no time limit)'
          % (desc, r.rc), r)
    shown = text.pattern if isinstance(text, re.Pattern) else text
    bad = [a for a in absent if has_text(r.out, a)]
    check(has_text(r.out, text) and not bad, '%s: the error says "%s"%s'
          % (desc, shown, ''.join(' (and not "%s")' % a for a in absent)),
          r.out if not bad else 'found %s in:\n%s' % (bad, r.out))
    changed = [p for p in files if before[p] != after[p]]
    check(not changed, '%s: %s byte-identical' % (desc, ', '.join(files)),
          'changed: %s' % changed)
    return r


# --- QEMU's own python library ----------------------------------------------
def python_qemu():
    """Put the tree's python/ on sys.path; the qemu package then imports."""
    path = os.path.join(SRC, 'python')
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def missing_tools(paths=(), commands=(), modules=()):
    """What of these is missing, as a list of words for a message."""
    gone = [p for p in paths if not os.access(p, os.X_OK)]
    gone += [c for c in commands if not shutil.which(c, path=ENV['PATH'] + ':/usr/sbin:/sbin')]
    for m in modules:
        try:
            __import__(m)
        except ImportError:
            gone.append('python module ' + m)
    return gone


class QemuIoShell:
    """qemu-io in interactive mode, its commands from a pipe: a process
    that holds an image open for as long as a test needs, and answers."""

    PROMPT = 'qemu-io> '

    def __init__(self, args):
        self.proc = subprocess.Popen([QEMU_IO] + [str(a) for a in args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=ENV)
        self.out = ''

    def alive(self):
        return self.proc.poll() is None

    def command(self, cmd, timeout=30):
        """Send cmd and wait for the prompt that follows its output: that
        output, or None if no prompt came in time (or it exited)."""
        start = len(self.out)
        try:
            self.proc.stdin.write(cmd.encode() + b'\n')
            self.proc.stdin.flush()
        except OSError:
            return None
        end = time.time() + timeout
        fd = self.proc.stdout.fileno()
        # The first prompt comes before any output; each later one ends a
        # command's output.
        while True:
            text = self.out[start:]
            if text.startswith(self.PROMPT):
                text = text[len(self.PROMPT):]
            if self.PROMPT in text:
                return text[:text.index(self.PROMPT)]
            left = end - time.time()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 65536)
            if not data:
                return None
            self.out += data.decode(errors='replace')

    def quit(self, timeout=30):
        """Ask it to quit: its exit status, or None if it had to be killed."""
        try:
            self.proc.stdin.write(b'quit\n')
            self.proc.stdin.flush()
        except OSError:
            pass
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
            self.out += rest.decode(errors='replace')
            return self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


# --- the README's command blocks ----------------------------------------------
README = os.path.join(TOP, 'README.md')
README_MARK = re.compile(r'<!--\s*readme-test:\s*(.*?)\s*-->')
# The paths the README's VM and hotplug blocks stand for: the header and
# the payload that qemu-img made, and those of its LUKS2 section
# (cryptsetup's header, a raw payload).
README_PATHS = ('/path/to/test-header.img', '/path/to/test-payload.qcow2')
README_LUKS2_PATHS = ('/path/to/luks2-header.img', '/path/to/luks2-payload.raw')


def readme_blocks(path=README):
    """The ```sh blocks of the README, in order, as (line number, marker,
    text); marker is what a <!-- readme-test: ... --> comment on the line
    right before the block says ('' if there is none)."""
    lines = text(path).split('\n')
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == '```sh':
            end = i + 1
            while end < len(lines) and lines[end].strip() != '```':
                end += 1
            m = README_MARK.fullmatch(lines[i - 1].strip()) if i else None
            blocks.append((i + 1, m.group(1) if m else '', '\n'.join(lines[i + 1:end]) + '\n'))
            i = end
        i += 1
    return blocks


def readme_block(*words):
    """The text of the one README block whose marker has all these words."""
    found = [t for _, mark, t in readme_blocks() if set(words) <= set(mark.split())]
    if len(found) != 1:
        raise LookupError('%d README blocks marked %s' % (len(found), ' '.join(words)))
    return found[0]


def vm_disk_options(block):
    """The -object, -blockdev and -device options of a qemu-system-x86_64
    command line, as (option, value) pairs."""
    words = shlex.split(block.replace('\\\n', ' '))
    return [(w, words[i + 1]) for i, w in enumerate(words[:-1])
            if w in ('-object', '-blockdev', '-device')]


def monitor_commands(block):
    """The JSON texts of the `virsh qemu-monitor-command VM '...'` lines."""
    return [shlex.split(line)[-1] for line in block.split('\n')
            if line.startswith('virsh qemu-monitor-command ')]
