"""The build under test and running its programs, for this repository's
suites (tests/*.py).

Run the suites with Debian's /usr/bin/python3 and PYTHONPATH as
scripts/test sets it: tests/lib, build/qemu/python (QEMU's own qemu.machine
and qemu.qmp) and build/qemu/tests/qemu-iotests (its iotests.py).

  TOP, BUILD, SRC, OBJ  this checkout; the build under test as
                 scripts/lib/lib.sh finds it: QEMU_LUKS_BUILD (default
                 build/ of this checkout) holds qemu/ (the source tree)
                 and obj/; QEMU_IMG, QEMU_IO, QEMU_NBD, QEMU_SYSTEM, QSD
                 its binaries, or those in QEMU_LUKS_BINDIR if it is set
                 (installed packages)
  ENV            the environment of commands: the binaries under test
                 first on PATH, messages in English
  run()          a command with a time limit, output and status captured
                 (a tap.Result)
  qemu_img(), qemu_io()   the binaries of the build under test
  time_limit()   a block of code with a time limit (SIGALRM)
  scratch()      a temporary directory, removed at exit
  sha256(), sha256_data(), sums(), read(), text(), write(), remove()
                 files
  missing_tools()  what of some programs and python modules is missing
  python_qemu()  QEMU's own python/ (qemu.machine, qemu.qmp) on sys.path
  qmp_ok()       a QMP command through QEMUMachine.command(), as a TAP line
  import_iotests()  QEMU's tests/qemu-iotests/iotests.py, with the
                 environment its import needs set to the build under test
"""

import atexit
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from tap import Result, check

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get('QEMU_LUKS_BUILD') or os.path.join(TOP, 'build')
SRC = os.path.join(BUILD, 'qemu')
OBJ = os.path.join(BUILD, 'obj')
# QEMU_LUKS_BINDIR: installed binaries to test instead, all in one
# directory (/usr/bin for the packages of scripts/package)
BINDIR = os.environ.get('QEMU_LUKS_BINDIR')
if BINDIR:
    QEMU_IMG, QEMU_IO, QEMU_NBD, QEMU_SYSTEM, QSD = (
        os.path.join(BINDIR, name) for name in (
            'qemu-img', 'qemu-io', 'qemu-nbd', 'qemu-system-x86_64',
            'qemu-storage-daemon'))
else:
    QEMU_IMG = os.path.join(OBJ, 'qemu-img')
    QEMU_IO = os.path.join(OBJ, 'qemu-io')
    QEMU_NBD = os.path.join(OBJ, 'qemu-nbd')
    QEMU_SYSTEM = os.path.join(OBJ, 'qemu-system-x86_64')
    QSD = os.path.join(OBJ, 'storage-daemon', 'qemu-storage-daemon')
IOTESTS = os.path.join(SRC, 'tests', 'qemu-iotests')
MiB = 1 << 20

# Commands see the binaries under test first, and messages in English.
ENV = dict(os.environ, PATH=(BINDIR or OBJ) + os.pathsep +
           os.environ.get('PATH', '/usr/bin:/bin'), LC_ALL='C')


# --- commands ---------------------------------------------------------------
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


@contextlib.contextmanager
def time_limit(seconds):
    """The block, with a time limit: TimeoutError once it has run for
    `seconds` (SIGALRM; the main thread only, one limit at a time)."""
    def expired(*_):
        raise TimeoutError('ran out of time (%d s)' % seconds)
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- files ------------------------------------------------------------------
def scratch(prefix='luks-test.'):
    """A fresh directory under /tmp, removed when the suite exits; the
    suite's working directory."""
    d = tempfile.mkdtemp(prefix=prefix)
    atexit.register(lambda: (os.chdir('/'), shutil.rmtree(d, ignore_errors=True)))
    os.chdir(d)
    return d


def sha256_data(data):
    return hashlib.sha256(data).hexdigest()


def sha256(path):
    """Of a file ("absent" when there is none)."""
    data = read(path)
    return sha256_data(data) if data is not None else 'absent'


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


# --- QEMU's own python library ----------------------------------------------
def python_qemu():
    """Make sure the tree's python/ is on sys.path (scripts/test puts it on
    PYTHONPATH); the qemu package then imports.  Returns its path."""
    path = os.path.join(SRC, 'python')
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def qmp_ok(vm, desc, cmd, **args):
    """One TAP line: QMP cmd with args (keys as they are) succeeds, sent
    with QEMUMachine.command(), which raises on an error; the line's
    diagnostic is then the error's class and text.  Returns the check."""
    from qemu.qmp import ExecuteError
    try:
        vm.command(cmd, conv_keys=False, **args)
    except ExecuteError as e:
        return check(False, desc, '%s %s: %s: %s' % (cmd, args, e.error_class, e))
    return check(True, desc)


def import_iotests():
    """QEMU's tests/qemu-iotests/iotests.py (7.2), imported.  Its import
    reads what ./check would set: the programs (QEMU_PROG, QEMU_IMG_PROG,
    QEMU_IO_PROG, QEMU_NBD_PROG, QSD_PROG, set here to the build under
    test, with no extra *_OPTIONS), and exits unless TEST_DIR, SOCK_DIR,
    CACHEMODE, AIOMODE and QEMU_DEFAULT_MACHINE are set; SAMPLE_IMG_DIR
    must be set too.  TEST_DIR and SOCK_DIR are a fresh directory, removed
    at exit.  (7.2's iotests.py reads no OUTPUT_DIR.)  These are set in
    os.environ, once, before the first import."""
    if 'iotests' not in sys.modules:
        d = tempfile.mkdtemp(prefix='iotests.')
        atexit.register(shutil.rmtree, d, True)
        os.environ.update({
            'QEMU_PROG': QEMU_SYSTEM, 'QEMU_IMG_PROG': QEMU_IMG, 'QEMU_IO_PROG': QEMU_IO,
            'QEMU_NBD_PROG': QEMU_NBD, 'QSD_PROG': QSD,
            'QEMU_OPTIONS': '', 'QEMU_IMG_OPTIONS': '', 'QEMU_IO_OPTIONS': '',
            'QEMU_IO_OPTIONS_NO_FMT': '', 'QEMU_NBD_OPTIONS': '',
            'TEST_DIR': d, 'SOCK_DIR': d, 'SAMPLE_IMG_DIR': os.path.join(IOTESTS, 'sample_images'),
            'CACHEMODE': 'writeback', 'AIOMODE': 'threads', 'QEMU_DEFAULT_MACHINE': 'pc',
            'IMGFMT': 'raw', 'IMGPROTO': 'file'})
        python_qemu()
        if IOTESTS not in sys.path:
            sys.path.append(IOTESTS)
    import iotests
    return iotests
