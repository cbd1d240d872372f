"""LUKS volumes as QEMU's tools name them, and the checks made on them,
for this repository's suites (tests/*.py).

  secret()       a --object secret argument
  node(), luks(), spec(), qcow2()   luks json: specs with a detached or
                 attached header, and the nodes in them
  PROBE_PAYLOAD  the name of the luks option that turns the payload probe off
  read_volume()  the whole plaintext of a volume, via qemu-img convert,
                 into a file that is removed first
  reads_back()   one TAP line: a volume reads back as a file
  has_text()     a plain string or a regular expression in a command's output
  refuses()      "must fail, saying this, leaving these files
                 byte-identical", as three TAP lines
"""

import json
import re

from proc import qemu_img, read, remove, run, sums
from tap import check

# The luks blockdev option that turns off the payload probe.  The series
# is renaming it (downstream QAPI names carry a vendor prefix); this is
# the one place that names it.
PROBE_PAYLOAD = '__org.example_probe-payload'


def secret(sid='sec0', data=None, file=None):
    """A --object secret argument."""
    return 'secret,id=%s,%s' % (sid, 'file=' + file if file else 'data=' + data)


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


# --- reading volumes ----------------------------------------------------------
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
