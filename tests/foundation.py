#!/usr/bin/python3
"""The build and test harness keeps its promises: checksums are enforced,
the series is re-applied only when patches/ changed, unexported work is
never thrown away, export is stable, scripts/build shows its progress and
keeps ninja's log, a rebuild with nothing changed compiles nothing, and
scripts/test fails a run whose suites crash, skip a listed iotest or
disagree with their plan.  Works on scratch copies; the real build/ and
downloads/ are only read.  Prints TAP."""

import os
import pty
import re
import shutil
import time

from proc import TOP, run, scratch, text, write
from tap import check, skip, tap


def script(name, *args, env=None, timeout=600, **kw):
    """Run scripts/NAME with extra environment variables."""
    return run(['bash', os.path.join(TOP, 'scripts', name)] + list(args), timeout,
               env=dict(os.environ, **(env or {})), **kw)


def lib(*names):
    """Values of variables as scripts/lib/lib.sh sets them."""
    r = run(['bash', '-c', '. "$0"; for v; do printf "%s\\n" "${!v}"; done',
             os.path.join(TOP, 'scripts', 'lib', 'lib.sh')] + list(names))
    return r.out.split('\n')[:len(names)]


def git(repo, *args):
    return run(['git', '-C', repo] + list(args))


def head(repo):
    return git(repo, 'rev-parse', 'HEAD').out.strip()


def compiled_nothing(log):
    """(True, '') if ninja's log says it compiled and linked nothing, else
    (False, why).  A missing log proves nothing, so it is a failure."""
    data = text(log)
    if not os.path.exists(log):
        return False, '%s is missing' % log
    if 'ninja: Entering directory' not in data:
        return False, '%s is not a log of ninja:\n%s' % (log, data)
    steps = [x for x in data.split('\n') if re.search(r'Compiling|Linking', x)]
    if steps:
        return False, '%d compile or link steps, e.g. %s' % (len(steps), steps[0])
    return True, ''


DOWNLOADS, SRC, OBJ, PATCHES, DSC, DEB_TAR, ORIG_TAR = lib(
    'DOWNLOADS', 'SRC', 'OBJ', 'PATCHES', 'QEMU_DSC', 'QEMU_DEBIAN_TAR', 'QEMU_ORIG_TAR')
TMP = scratch('foundation.')

# --- checksums -------------------------------------------------------------
dl = os.path.join(TMP, 'dl')
os.mkdir(dl)
for f in (DSC, DEB_TAR, ORIG_TAR):
    shutil.copy(os.path.join(DOWNLOADS, f), dl)
r = script('lib/fetch', env={'QEMU_LUKS_DOWNLOADS': dl})
check(r.ok, 'intact cached source verifies', r)
with open(os.path.join(dl, ORIG_TAR), 'r+b') as f:
    f.seek(1000)
    byte = f.read(1)
    f.seek(1000)
    f.write(bytes([byte[0] ^ 0xff]))
r = script('lib/fetch', env={'QEMU_LUKS_DOWNLOADS': dl})
check(r.refused, 'corrupted tarball stops the build', r)
check('SHA-256 mismatch for downloads/' + ORIG_TAR in r.out,
      'with a checksum error naming the file', r.out)
shutil.copy(os.path.join(DOWNLOADS, ORIG_TAR), dl)     # intact again, for later

# --- series application ----------------------------------------------------
# A scratch build dir whose work tree shares objects with the real one.
B, P = os.path.join(TMP, 'build'), os.path.join(TMP, 'patches')
os.makedirs(B)
shutil.copytree(PATCHES, P)
git(TMP, 'clone', '-q', '--shared', SRC, os.path.join(B, 'qemu'))
Q = os.path.join(B, 'qemu')
git(Q, 'checkout', '-q', '-B', 'master', head(SRC))
git(Q, 'config', 'user.name', 'test')
git(Q, 'config', 'user.email', 'test@localhost')
# The stand-in builds below have no fuzz build
ENV = {'QEMU_LUKS_BUILD': B, 'QEMU_LUKS_PATCHES': P, 'QEMU_LUKS_DOWNLOADS': dl,
       'QEMU_LUKS_BUILD_FUZZ': 'no'}


def prepare():
    return script('lib/prepare', env=ENV)


def tree_state():
    """HEAD, the index and work tree status, and the stamp."""
    return (head(Q), git(Q, 'status', '--porcelain').out,
            text(os.path.join(B, 'series.stamp')))


r = prepare()
check(r.ok, 'work tree matching patches/ is left alone', r)
head_before = head(Q)

# Unexported work must never be thrown away: a commit, then an edit.
series = os.path.join(P, 'series')
with open(series, 'a') as f:
    f.write('\n# changed\n')
with open(os.path.join(Q, 'README.rst'), 'a') as f:
    f.write('/* local */\n')
git(Q, 'commit', '-q', '-am', 'local work')
for what in ('unexported commit', 'uncommitted edit'):
    if what == 'uncommitted edit':
        with open(os.path.join(Q, 'README.rst'), 'a') as f:
            f.write('/* more */\n')
    before = tree_state()
    r = prepare()
    check(r.refused, what + ': prepare refuses', r)
    check('holds work that is not in patches/' in r.out, what + ': refusal says why', r.out)
    check(tree_state() == before, what + ': HEAD, the work tree and the stamp are unchanged',
          'before: %s\nafter:  %s' % (before, tree_state()))
git(Q, 'checkout', '-q', '--', 'README.rst')

# Export is stable: twice in a row, byte-identical.
script('export', env=ENV)
shutil.copytree(P, os.path.join(TMP, 'export1'))
script('export', env=ENV)
r = run(['diff', '-r', os.path.join(TMP, 'export1'), P])
check(r.ok, 'export twice gives identical files', r)
hashes = [line for f in os.listdir(P) if f.endswith('.patch')
          for line in text(os.path.join(P, f)).split('\n')
          if re.match(r'From [0-9a-f]{40} ', line) and not line.startswith('From ' + '0' * 40)]
check(not hashes, 'exported files carry no commit hash', '\n'.join(hashes))
check('# changed' in text(series).split('\n'),
      'export keeps the comment lines of patches/series (the topic headings)',
      text(series))
r = prepare()
check(r.ok, 'after export, prepare accepts the tree', r)

# patches/ changed upstream (say by a pull): applied afresh.
lines = text(series).rstrip('\n').split('\n')
last = [line for line in lines if line.strip() and not line.startswith('#')][-1]
os.unlink(os.path.join(P, last))
write(series, ''.join(line + '\n' for line in lines if line != last).encode())
r = prepare()
check(r.ok, 'changed patches/ is applied afresh', r)
check(git(Q, 'rev-parse', 'HEAD^{tree}').out == git(Q, 'rev-parse', head_before + '^{tree}').out,
      'the dropped commit is gone from the tree')
head_now = head(Q)
prepare()
check(head(Q) == head_now, 're-running with nothing changed changes nothing')

# --- scripts/build, on a stand-in build.ninja --------------------------------
# The scratch build above with an obj/ whose build.ninja only touches files
# (same target names, same "Compiling"/"Linking" words as QEMU's): the
# whole of scripts/build runs, compiling nothing real.
r = prepare()   # back to exactly patches/
O = os.path.join(B, 'obj')
os.makedirs(os.path.join(O, 'storage-daemon'))
flags = run(['bash', '-c', 'eval "$(sed -n "/^CONFIGURE_FLAGS=(/,/^)/p" "$0")"; '
             'printf %s "${CONFIGURE_FLAGS[*]}"', os.path.join(TOP, 'scripts', 'build')]).out
write(os.path.join(O, '.configure-flags'), flags.encode())
write(os.path.join(O, 'stub.c'), b'')
TARGETS = ['qemu-system-x86_64', 'qemu-img', 'qemu-io', 'qemu-nbd',
           'storage-daemon/qemu-storage-daemon']
# and the unit tests that tests/unit.list names
TARGETS += ['tests/unit/' + line.split()[0]
            for line in text(os.path.join(TOP, 'tests', 'unit.list')).splitlines()
            if line.split('#')[0].strip()]
objs = ['o%d.o' % i for i in range(12)]
write(os.path.join(O, 'build.ninja'), ('''rule cc
  command = sleep 0.1 && touch $out
  description = Compiling C object $out
rule link
  command = printf '#!/bin/sh\\n' > $out && chmod +x $out
  description = Linking target $out
''' + ''.join('build %s: cc stub.c\n' % o for o in objs)
    + ''.join('build %s: link %s\n' % (t, ' '.join(objs)) for t in TARGETS)).encode())
steps = len(objs) + len(TARGETS)
log = os.path.join(O, 'ninja.log')

r = script('build', env=ENV)
check(r.ok and all(os.access(os.path.join(O, t), os.X_OK) for t in TARGETS),
      'build (stand-in): scripts/build runs through and makes the %d targets' % len(TARGETS), r)
stages = re.findall(r'^==> \[\d+:\d\d\] (\w+)', r.out, re.M)
check(stages[:4] == ['packages', 'source', 'series', 'compiling'] and stages[-1] == 'done',
      'build (stand-in): a line per stage, with the time elapsed', r.out)
counts = re.findall(r'^==> \[\d+:\d\d\] compiling \[(\d+)/(\d+)\]$', r.out, re.M)
check(len(counts) >= 10 and counts[-1] == (str(steps), str(steps)),
      'build (stand-in): without a terminal, a progress line at every tenth of the %d steps '
      '(%d lines)' % (steps, len(counts)), r.out)
logged = re.findall(r'^\[(\d+)/(\d+)\] (Compiling|Linking)', text(log), re.M)
check(len(logged) == steps, "build (stand-in): ninja's whole output is in obj/ninja.log",
      text(log))
ok, why = compiled_nothing(log)
check(not ok and 'compile or link steps' in why,
      'build (stand-in): the "compiles nothing" check sees that this build compiled', why)

# On a terminal: one line, rewritten in place.
for t in TARGETS:
    os.unlink(os.path.join(O, t))
pid, fd = pty.fork()
if pid == 0:
    os.environ.update(ENV)
    os.execvp('bash', ['bash', os.path.join(TOP, 'scripts', 'build')])
out, end = b'', time.time() + 120
while time.time() < end:
    try:
        chunk = os.read(fd, 65536)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
_, st = os.waitpid(pid, 0)
out = out.decode(errors='replace')
updates = re.findall(r'\r==> \[\d+:\d\d\] compiling \[(\d+)/(\d+)\]', out)
check(os.waitstatus_to_exitcode(st) == 0 and len(updates) == len(TARGETS)
      and not re.search(r'\n==> \[\d+:\d\d\] compiling \[', out),
      'build (stand-in): on a terminal, the [N/M] counter updates one line (%d updates)'
      % len(updates), out)

t0 = time.time()
r = script('build', env=ENV)
check(r.ok and 'up to date: nothing compiled or linked' in r.out,
      'build (stand-in): a second run says there is nothing to compile (%.0f s)'
      % (time.time() - t0), r)
ok, why = compiled_nothing(log)
check(ok, 'build (stand-in): and its ninja.log shows no compile or link step', why)
os.rename(log, log + '.moved')
ok, why = compiled_nothing(log)
check(not ok and 'missing' in why, 'build (stand-in): a missing ninja.log fails the '
      '"compiles nothing" check', why)

# --- the real build: nothing to do ----------------------------------------------
# The test command runs after the build command: building again must
# recompile nothing and take well under a minute.  Only on this checkout's
# own build/: a build elsewhere (QEMU_LUKS_BUILD) may belong to someone
# else's work tree.
BUILD = os.path.dirname(OBJ)
if os.path.realpath(BUILD) == os.path.realpath(os.path.join(TOP, 'build')):
    t0 = time.time()
    r = script('build')
    secs = time.time() - t0
    check(r.ok, 'second build succeeds', r)
    check(secs < 60, 'second build takes under a minute (%.0f s)' % secs)
    ok, why = compiled_nothing(os.path.join(OBJ, 'ninja.log'))
    check(ok, 'second build compiles and links nothing', why)
else:
    skip('second build of %s' % BUILD, 'not this checkout\'s build/ (QEMU_LUKS_BUILD): '
         'scripts/build is not run on it')

# --- scripts/test: what fails a run ---------------------------------------------
# A copy of the harness with stand-in suites, and a stand-in iotests
# ./check, against a stand-in build.
T = os.path.join(TMP, 'top')
os.makedirs(os.path.join(T, 'tests'))
shutil.copytree(os.path.join(TOP, 'scripts'), os.path.join(T, 'scripts'))
shutil.copy(os.path.join(TOP, 'source.conf'), T)
FB = os.path.join(TMP, 'fakebuild')
os.makedirs(os.path.join(FB, 'obj', 'tests', 'qemu-iotests'))
write(os.path.join(FB, 'obj', 'qemu-img'), b'#!/bin/sh\n')
os.chmod(os.path.join(FB, 'obj', 'qemu-img'), 0o755)
write(os.path.join(T, 'tests', 'iotests.list'), b'luks 210 luks-detached-header\nqcow2 188\n')
check_script = os.path.join(FB, 'obj', 'tests', 'qemu-iotests', 'check')
write(check_script, b'''#!/bin/bash
# stand-in for the iotests ./check -tap -FMT TESTS: tests named in $NOT_RUN
# are "not run", the others pass
fmt=${2#-}; shift 2
echo "1..$#"
for t; do
    case " ${NOT_RUN:-} " in
        *" $t "*) echo "ok $fmt $t # SKIP" ;;
        *) echo "ok $fmt $t" ;;
    esac
done
''')
os.chmod(check_script, 0o755)
SUITES = {
    'good': 'print("ok 1 - a")\nprint("ok 2 - b")\nprint("1..2")\n',
    'badplan': 'print("ok 1 - a")\nprint("1..2")\n',
    'crash': 'print("ok 1 - a")\nraise SystemExit(3)\n',
    'noplan': 'print("ok 1 - a")\n',
    'empty': 'print("1..0")\n',
}
for name, body in SUITES.items():
    write(os.path.join(T, 'tests', name + '.py'), body.encode())
write(os.path.join(T, 'tests', 'suites.list'), ''.join(n + '\n' for n in SUITES).encode())


def run_test(*suites, not_run=''):
    return run(['bash', os.path.join(T, 'scripts', 'test')] + list(suites), 120,
               env=dict(os.environ, QEMU_LUKS_BUILD=FB, NOT_RUN=not_run))


r = run_test('iotests', 'good')
check(r.ok and r.out.rstrip().endswith('5 passed, 0 failed'),
      'scripts/test (stand-ins): all listed iotests run and a sound suite: '
      '"5 passed, 0 failed", exit status 0', r)
r = run_test('iotests', not_run='luks-detached-header')
check(r.refused and 'FAILED: iotests: luks luks-detached-header # did not run' in r.out
      and r.out.rstrip().endswith('2 passed, 1 failed'),
      'scripts/test (stand-ins): a listed iotest that is not run fails the run', r)
for name, why in [('badplan', "plan '1..2' disagrees with its 1 test lines"),
                  ('crash', 'exited with status 3'),
                  ('noplan', "plan '1..(none)' disagrees"),
                  ('empty', 'ran no test')]:
    r = run_test(name)
    check(r.refused and 'FAILED: %s: %s' % (name, why) in r.out,
          'scripts/test (stand-ins): a suite that %s fails the run' % {
              'badplan': 'prints fewer tests than its plan', 'crash': 'crashes',
              'noplan': 'prints no plan', 'empty': 'runs no test'}[name], r)

tap.done()
