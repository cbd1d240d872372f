"""TAP output of this repository's suites (tests/*.py).

  TAP            numbered "ok N - ..." / "not ok N - ..." lines, "#"
                 diagnostics, and the plan "1..N" at the end (done())
  tap            the suite's one TAP; check, diag and skip are its methods
  Result         a finished command (proc.run()), printed as a diagnostic
"""

import sys

sys.stdout.reconfigure(line_buffering=True)


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


class Result:
    """A finished command: rc (None if it timed out, negative if killed by
    a signal) and out (stdout and stderr together).  As a string (the
    `why` of a failed check), the command, its status and its output."""

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
