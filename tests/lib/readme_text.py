"""The README's command blocks, for the suites that run them (tests/readme.py,
tests/guest-e2e.py).

(Not named readme.py: the suite tests/readme.py would shadow it, as a
script's own directory comes first on sys.path.)

  README         this checkout's README.md
  README_PATHS, README_LUKS2_PATHS   the paths its VM blocks stand for
  readme_blocks()  its ```sh blocks and their readme-test markers
  readme_block()   the one block with some marker words
  vm_disk_options()  the -object, -blockdev and -device options of a
                 qemu-system-x86_64 command line
  monitor_commands()  the JSON of its `virsh qemu-monitor-command` lines
"""

import os
import re
import shlex

from proc import TOP, text

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
