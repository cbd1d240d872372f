#!/usr/bin/python3
"""The README's command blocks run as written: every ```sh block of
README.md, in order, in one empty directory, with the build's binaries
first on PATH, each must exit 0 (run with bash -e, so a failing command
inside a block fails it too).

A comment <!-- readme-test: ... --> right before a block says otherwise:
  not-run (why)         not run here; its commands must exist in the
                        checkout (the build and test commands themselves)
  guest-e2e TEST...     needs a guest: tests/guest-e2e.py runs its text in
                        those tests; here it must parse as they read it
  package-check (why)   needs the packages that scripts/package builds:
                        scripts/lib/package-check runs it as written, from
                        the checkout, once they are built; here its
                        programs must be installed or in the checkout
Prints TAP."""

import json
import os

from proc import OBJ, TOP, missing_tools, run, scratch
from readme_text import (README_LUKS2_PATHS, README_PATHS, monitor_commands, readme_blocks,
                         vm_disk_options)
from tap import check, tap

gone = missing_tools([os.path.join(OBJ, x) for x in ('qemu-img', 'qemu-io')])
if gone:
    check(False, 'the build under test has its binaries: missing ' + ', '.join(gone))
    tap.done()
scratch('readme.')
blocks = readme_blocks()
r = run(['bash', '-c', 'command -v qemu-img qemu-io'])
check(r.out.split() == [os.path.join(OBJ, 'qemu-img'), os.path.join(OBJ, 'qemu-io')],
      'the blocks find the binaries of the build under test first on PATH', r)
check(len(blocks) >= 5, 'README.md has command blocks (%d)' % len(blocks))

for line, mark, text in blocks:
    first = next((x.strip() for x in text.split('\n') if x.strip() and not
                  x.startswith('#')), '')
    what = 'README.md line %d (%s)' % (line, ' '.join(first.split()[:2]))
    kind = mark.split()[0] if mark else ''
    if not mark:
        r = run(['bash', '-e', '-o', 'pipefail', '-c', text], timeout=300)
        check(r.ok, what + ': runs as written', r)
    elif kind == 'not-run':
        cmds = [x.split()[0] for x in text.split('\n') if x.strip() and not x.startswith('#')]
        bad = [c for c in cmds if not os.access(os.path.join(TOP, c), os.X_OK)]
        check(cmds and not bad, '%s: not run here %s; its commands %s exist in the checkout'
              % (what, mark[len(kind):].strip(), ', '.join(cmds)), 'missing: %s' % bad)
    elif kind == 'package-check':
        words = [x.split()[0] for x in text.replace('\\\n', ' ').split('\n')
                 if x.strip() and not x.startswith('#')]
        bad = [c for c in words if not (os.access(os.path.join(TOP, c), os.X_OK) or
                                        run(['bash', '-c', 'command -v ' + c]).ok)]
        check(words and not bad, '%s: run by scripts/package --check %s; its programs %s '
              'are installed or in the checkout' % (what, mark[len(kind):].strip(),
                                                    ', '.join(words)), 'missing: %s' % bad)
    elif kind == 'guest-e2e':
        tests = ', '.join(mark.split()[1:])
        if first.startswith('virsh'):
            cmds = monitor_commands(text)
            try:
                ok = [json.loads(c)['execute'] for c in cmds] == (
                    ['object-add'] + ['blockdev-add'] * 5 + ['device_add'])
            except (ValueError, KeyError):
                ok = False
            check(ok, '%s: needs a guest, run by tests/guest-e2e.py (%s); its %d monitor '
                  'commands parse: object-add, 5 blockdev-add, device_add'
                  % (what, tests, len(cmds)), text)
        else:
            opts = vm_disk_options(text)
            paths = README_LUKS2_PATHS if README_LUKS2_PATHS[0] in text else README_PATHS
            try:
                names = [o for o, _ in opts]
                ok = (names == ['-object'] + ['-blockdev'] * 5 + ['-device'] and
                      all(json.loads(v) for _, v in opts) and
                      all(p in text for p in paths))
            except ValueError:
                ok = False
            check(ok, '%s: needs a guest, run by tests/guest-e2e.py (%s); its options parse: '
                  '-object, 5 -blockdev, -device, on %s' % (what, tests, ' and '.join(paths)),
                  text)
    else:
        check(False, '%s: a known readme-test marker (not "%s")' % (what, mark))

tap.done()
