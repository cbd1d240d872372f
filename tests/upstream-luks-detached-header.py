#!/usr/bin/python3
"""A peer's test: upstream QEMU's own iotest of detached LUKS headers,
tests/qemu-iotests/tests/luks-detached-header, as QEMU 10.2 has it, run
against the series by 7.2's ./check.  Its oracle is upstream's: the
test's assertions and its expected output (.out), both untouched.

The test comes from Debian's qemu 1:10.2.2+ds-1 source package, pinned
in source.conf (UPSTREAM_*): both tarballs are fetched at test time into
downloads/ (QEMU_LUKS_DOWNLOADS) unless they are there already, and
verified against their pinned size and SHA-256, as scripts/lib/fetch
verifies 7.2's; none of Debian's patches may touch the test (they are
not applied).  Only the test and its .out are extracted, into a scratch
iotests directory whose other files are links to 7.2's; nothing of
upstream's is kept in the repository.  tests/upstream/
luks-detached-header-shim.py runs the test there, adapted only where
7.2's python/qemu differs (its docstring says where and why).

Two runs, each a whole ./check -luks run of the test:

1. As is.  The series refuses, by design, a payload that holds an image
   (block/crypto.c, block_crypto_check_detached_payload), and the test
   gives a qcow2 *file* as the raw payload of a detached header.  So
   exactly its qcow2-file cases must fail, each at the statement that
   opens that payload and with the series' refusal, "The LUKS payload
   '.../detached_payload_qcow2.img' holds a qcow2 image"; every
   assertion before them passes.
2. With the series' payload check off ("__org.example_probe-payload":
   false, added by the shim to every detached-header luks node of the
   test): ./check passes the test, its output equal to upstream's .out.

Prints TAP.
"""

import hashlib
import lzma
import os
import re
import shutil
import signal
import tarfile
import time
import urllib.request

from proc import (ENV, IOTESTS, QEMU_IMG, QEMU_IO, QEMU_NBD, QEMU_SYSTEM,
                  QSD, TOP, missing_tools, run, scratch, text)
from tap import check, diag, tap

TEST = 'luks-detached-header'
MEMBER = 'tests/qemu-iotests/tests/' + TEST     # in the tarball, under qemu-VERSION/
SHIM = os.path.join(TOP, 'tests', 'upstream', TEST + '-shim.py')
CHECK_72 = os.path.join(IOTESTS, 'check')

# The upstream cases that give the qcow2 file as the raw payload of a
# detached header, and where each meets the series' refusal: a statement
# of the test (text of one of its lines) and the line of the assertion
# that then fails (+N lines on), found in the test as fetched, so that a
# change of upstream's test shows here rather than passing unnoticed.
REFUSED = {
    'test_img_creation': ('qemu_img_info(detached_header_qcow2_img)', None),
    'test_detached_luks_header': ('node_name="luks-3-payload-qcow2-format"',
                                  'self.assert_qmp(result, "return", {})'),
}
REFUSAL = "The LUKS payload '%s' holds a qcow2 image"      # block/crypto.c
QCOW2_PAYLOAD = 'detached_payload_qcow2.img'               # the test's file
# What tearDown of a case that failed with its VM still running says:
# get_log() is None until the VM is shut down (7.2 and 10.2 alike).
TEARDOWN_AFTER = "TypeError: argument of type 'NoneType' is not iterable"
TIME_LIMIT = 300                 # one ./check run; it takes about 10 s

# The variables of 7.2's testenv.py, which ./check sets itself: none is
# inherited from the suite's environment.
TESTENV_VARS = ('PYTHONPATH', 'TEST_DIR', 'SOCK_DIR', 'SAMPLE_IMG_DIR', 'PYTHON',
                'QEMU_PROG', 'QEMU_IMG_PROG', 'QEMU_IO_PROG', 'QEMU_NBD_PROG',
                'QSD_PROG', 'QEMU_OPTIONS', 'QEMU_IMG_OPTIONS', 'QEMU_IO_OPTIONS',
                'QEMU_IO_OPTIONS_NO_FMT', 'QEMU_NBD_OPTIONS', 'IMGOPTS', 'IMGFMT',
                'IMGPROTO', 'AIOMODE', 'CACHEMODE', 'VALGRIND_QEMU',
                'CACHEMODE_IS_DEFAULT', 'IMGFMT_GENERIC', 'IMGOPTSSYNTAX',
                'IMGKEYSECRET', 'QEMU_DEFAULT_MACHINE', 'MALLOC_PERTURB_',
                'GDB_OPTIONS', 'PRINT_QEMU', 'UPSTREAM_SHIM_PROBE_PAYLOAD')


def lib(*names):
    """Values of variables as scripts/lib/lib.sh sets them (source.conf,
    DOWNLOADS)."""
    r = run(['bash', '-c', '. "$0"; for v; do printf "%s\\n" "${!v}"; done',
             os.path.join(TOP, 'scripts', 'lib', 'lib.sh')] + list(names))
    return r.out.split('\n')[:len(names)]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def verified(path, size, sha):
    """'' if the file at @path has the pinned @size and @sha, else why not."""
    got = os.path.getsize(path)
    if got != size:
        return 'size mismatch for %s: expected %d, got %d' % (path, size, got)
    got = sha256_file(path)
    if got != sha:
        return ('SHA-256 mismatch for %s\n  expected %s\n  got      %s'
                % (path, sha, got))
    return ''


def fetch(downloads, pool, name, size, sha):
    """downloads/@name, fetched from @pool unless it is there, and
    verified; its path, or None after a failed check.  As scripts/lib/fetch
    does: a cached file is verified at every run and never fetched again;
    one that fails is refused, and left for a person to delete."""
    path = os.path.join(downloads, name)
    if not os.path.exists(path):
        os.makedirs(downloads, exist_ok=True)
        part = path + '.part'
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(pool + '/' + name, timeout=60) as r, \
                    open(part, 'wb') as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except OSError as e:
            if os.path.exists(part):
                os.unlink(part)
            check(False, 'fetched %s from %s' % (name, pool), str(e))
            return None
        why = verified(part, size, sha)
        if why:
            os.unlink(part)
            check(False, 'fetched %s has the pinned size and SHA-256' % name, why)
            return None
        os.replace(part, path)
        diag('fetched %s (%d bytes) in %.1f s' % (name, size, time.monotonic() - t0))
    else:
        diag('%s cached in %s' % (name, downloads))
    why = verified(path, size, sha)
    if not check(not why, '%s has the pinned size and SHA-256' % name,
                 why + '\nDelete the file to fetch it again.'):
        return None
    return path


def patches_touching(debian_tar, member):
    """The patches of a debian.tar.xz that name @member (no a/ or b/)."""
    touching = []
    with tarfile.open(debian_tar, 'r:xz') as t:
        for m in t.getmembers():
            if m.isfile() and m.name.startswith('debian/patches/'):
                data = t.extractfile(m).read().decode(errors='replace')
                if member in data:
                    touching.append(m.name)
    return touching


def iotests_tree(root, test, out):
    """A scratch copy of 7.2's tests/qemu-iotests in @root/iotests, made of
    links to its files, whose tests/ holds only the shim (as TEST), the
    upstream test beside it and its .out; and @root/obj/check, a link to
    its check, as build/obj/tests/qemu-iotests/check is: ./check takes its
    tests from the directory its link points to.  Returns that check."""
    src = os.path.join(root, 'iotests')
    os.makedirs(os.path.join(src, 'tests'))
    for name in os.listdir(IOTESTS):
        if name != 'tests':
            os.symlink(os.path.join(IOTESTS, name), os.path.join(src, name))
    shutil.copy(SHIM, os.path.join(src, 'tests', TEST))
    os.chmod(os.path.join(src, 'tests', TEST), 0o755)
    shutil.copy(test, os.path.join(src, 'tests', TEST + '.upstream'))
    shutil.copy(out, os.path.join(src, 'tests', TEST + '.out'))
    obj = os.path.join(root, 'obj')
    os.makedirs(obj)
    os.symlink(os.path.join(src, 'check'), os.path.join(obj, 'check'))
    return os.path.join(obj, 'check')


def kill_leftovers(marker):
    """SIGKILL the processes whose command line holds @marker (this run's
    scratch SOCK_DIR, so only the QEMUs this run started): a case that
    fails leaves its VM running (upstream's tearDown doesn't shut it
    down), and nothing stops that QEMU when the test exits.  Returns
    their pids."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/cmdline' % pid, 'rb') as f:
                cmdline = f.read().decode(errors='replace')
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
                pids.append(int(pid))
            except OSError:
                pass
    return pids


def check_run(check_path, root, probe_off):
    """./check -luks -tap TEST, with TEST_DIR and SOCK_DIR in @root and the
    binaries of the build under test.  Returns its result, what the test
    printed (the .out.bad that ./check leaves when the test fails, or ''),
    the seconds it took and its TEST_DIR."""
    test_dir, sock_dir = os.path.join(root, 'test'), os.path.join(root, 'sock')
    os.makedirs(test_dir)
    os.makedirs(sock_dir)
    env = {k: v for k, v in ENV.items() if k not in TESTENV_VARS}
    env.update(TEST_DIR=test_dir, SOCK_DIR=sock_dir, QEMU_PROG=QEMU_SYSTEM,
               QEMU_IMG_PROG=QEMU_IMG, QEMU_IO_PROG=QEMU_IO,
               QEMU_NBD_PROG=QEMU_NBD, QSD_PROG=QSD)
    if probe_off:
        env['UPSTREAM_SHIM_PROBE_PAYLOAD'] = 'off'
    t0 = time.monotonic()
    r = run(['/usr/bin/python3', check_path, '-luks', '-tap', TEST],
            timeout=TIME_LIMIT, env=env, cwd=os.path.dirname(check_path))
    took = time.monotonic() - t0
    killed = kill_leftovers(sock_dir)
    if killed:
        diag('killed the QEMUs the test left running: %s' % killed)
    return r, text(os.path.join(test_dir, TEST + '.out.bad')), took, test_dir


def failures(output):
    """The FAIL and ERROR blocks of unittest's output: (kind, case, text)."""
    blocks = re.split(r'^={60,}\n', output, flags=re.M)[1:]
    found = []
    for b in blocks:
        m = re.match(r'(FAIL|ERROR): (\w+) \(', b)
        found.append((m.group(1), m.group(2), b) if m else ('?', '?', b))
    return found


def squeeze(s):
    """@s without white space and box drawing: 7.2's qemu.utils wraps the
    stderr of a failed qemu-img into a box of 70 columns, which may break
    a message anywhere, even inside a file name."""
    return re.sub(r'[\s\u2503]+', '', s)


def line_of(lines, needle, start=0):
    """The 1-based number of the first line from @start that holds
    @needle, or None."""
    for i in range(start, len(lines)):
        if needle in lines[i]:
            return i + 1
    return None


def main():
    gone = missing_tools([QEMU_SYSTEM, QEMU_IMG, QEMU_IO, QEMU_NBD, QSD, CHECK_72],
                         ['tar', 'xz'])
    if gone:
        check(False, 'prerequisites present: missing ' + ', '.join(gone))
        tap.done()
    pins = ('DOWNLOADS', 'UPSTREAM_DEB_VERSION', 'UPSTREAM_POOL',
            'UPSTREAM_ORIG_TAR', 'UPSTREAM_ORIG_SIZE', 'UPSTREAM_ORIG_SHA256',
            'UPSTREAM_DEBIAN_TAR', 'UPSTREAM_DEBIAN_SIZE', 'UPSTREAM_DEBIAN_SHA256')
    values = dict(zip(pins, lib(*pins)))
    if not check(all(values.values()) and values['UPSTREAM_ORIG_SIZE'].isdigit()
                 and values['UPSTREAM_DEBIAN_SIZE'].isdigit(),
                 'source.conf pins the upstream source package (UPSTREAM_*)',
                 '\n'.join('%s=%r' % kv for kv in values.items())):
        tap.done()
    tmp = scratch('upstream-luks.')
    diag('Debian qemu %s, from %s' % (values['UPSTREAM_DEB_VERSION'],
                                      values['UPSTREAM_POOL']))

    t0 = time.monotonic()
    orig = fetch(values['DOWNLOADS'], values['UPSTREAM_POOL'], values['UPSTREAM_ORIG_TAR'],
                 int(values['UPSTREAM_ORIG_SIZE']), values['UPSTREAM_ORIG_SHA256'])
    deb = fetch(values['DOWNLOADS'], values['UPSTREAM_POOL'], values['UPSTREAM_DEBIAN_TAR'],
                int(values['UPSTREAM_DEBIAN_SIZE']), values['UPSTREAM_DEBIAN_SHA256'])
    diag('source ready in %.1f s' % (time.monotonic() - t0))
    if not orig or not deb:
        tap.done()
    try:
        touching = patches_touching(deb, MEMBER)
    except (tarfile.TarError, lzma.LZMAError, OSError) as e:
        touching = ['(unreadable: %s)' % e]
    check(not touching, "none of Debian's patches of %s touches %s, so the "
          'orig tarball has the test as Debian ships it'
          % (values['UPSTREAM_DEB_VERSION'], MEMBER),
          'to apply: ' + ', '.join(touching))

    t0 = time.monotonic()
    r = run(['tar', '-xJf', orig, '-C', tmp, '--wildcards', '*/' + MEMBER + '*'],
            timeout=120)
    found = sorted(os.path.relpath(os.path.join(d, f), tmp)
                   for d, _, files in os.walk(tmp) for f in files)
    names = sorted(os.path.basename(f) for f in found)
    if not check(r.ok and names == [TEST, TEST + '.out'],
                 'the tarball holds the test and its .out, and only they are '
                 'extracted', '%s\nextracted: %s' % (r, found)):
        tap.done()
    diag('extracted %s in %.1f s' % (', '.join(found), time.monotonic() - t0))
    test = os.path.join(tmp, next(f for f in found if f.endswith(TEST)))
    lines = text(test).split('\n')

    # Where each refused case must fail: line numbers in the test.
    where = {}
    for case, (statement, assertion) in REFUSED.items():
        n = line_of(lines, statement)
        if n and assertion:
            n = line_of(lines, assertion, n)
        where[case] = n
    if not check(all(where.values()), 'the test has the qcow2-file statements '
                 'that the series refuses', where):
        tap.done()

    # Run 1: as is.
    check_path = iotests_tree(os.path.join(tmp, 'run1'), test, test + '.out')
    r, out, took, test_dir = check_run(check_path, os.path.join(tmp, 'run1'), False)
    diag('run 1 (as is): ./check took %.1f s' % took)
    check(r.rc is not None and re.search(r'^not ok luks %s$' % TEST, r.out, re.M),
          'run 1 (as is): ./check fails the test', r)
    ran = re.search(r'^Ran \d+ tests?$', text(test + '.out'), re.M)
    check(ran and ran.group(0) in out.split('\n'),
          "run 1: all of the test's cases ran (%s, as its .out says)"
          % (ran.group(0) if ran else '?'), out)
    fails = failures(out)
    refusal = REFUSAL % os.path.join(test_dir, QCOW2_PAYLOAD)
    for case, n in where.items():
        at = 'luks-detached-header.upstream", line %d, in %s' % (n, case)
        hits = [b for kind, c, b in fails if c == case and at in b]
        check(hits and squeeze(refusal) in squeeze(hits[0]),
              'run 1: %s fails at line %d, where it opens the qcow2 file as '
              'the payload, refused by the series: "%s"'
              % (case, n, REFUSAL % ('TEST_DIR/' + QCOW2_PAYLOAD)),
              hits[0] if hits else out)
    others = [b for kind, c, b in fails
              if not (c in where and 'line %d, in %s' % (where[c], c) in b
                      and squeeze(refusal) in squeeze(b))
              and not (c in where and 'in tearDown' in b and TEARDOWN_AFTER in b)]
    check(fails and not others,
          'run 1: no other failure (beyond the tearDown of a refused case, '
          'whose VM is still running)', '\n'.join(others) or out)
    check(squeeze(out).count(squeeze("The LUKS payload '")) ==
          squeeze(out).count(squeeze(refusal)),
          'run 1: the series refuses no payload but the qcow2 file', out)

    # Run 2: the payload check off.
    check_path = iotests_tree(os.path.join(tmp, 'run2'), test, test + '.out')
    r, out, took, _ = check_run(check_path, os.path.join(tmp, 'run2'), True)
    diag('run 2 (payload check off): ./check took %.1f s' % took)
    check(r.ok and re.search(r'^ok luks %s$' % TEST, r.out, re.M),
          'run 2 (payload check off): ./check passes the test, its output '
          "equal to upstream's .out", '%s\n%s' % (r, out))
    tap.done()


main()
