#!/usr/bin/python3
"""Turn one git format-patch file of the series into a Debian patch with a
DEP-3 header (https://dep-team.pages.debian.net/deps/dep3/), on stdout.

  dep3.py PATCH ORIGIN

The header has Description (the subject, then the commit message folded
as a long description), Author, Origin (ORIGIN), Forwarded: no, and
Last-Update (the commit's date).  After it comes the patch as git wrote
it, from its "---" line: the diffstat and the diffs, which dpkg-source
and quilt apply with patch(1).  Part of scripts/package.
"""

import email.utils
import sys


def main():
    path, origin = sys.argv[1:]
    with open(path, encoding='utf-8') as f:
        lines = f.read().split('\n')
    if not lines[0].startswith('From '):
        sys.exit(f'{path}: not a git format-patch file')
    # The mail headers, up to the first blank line; Subject may be folded
    headers, i = {}, 1
    last = None
    while lines[i]:
        if lines[i][0] in ' \t' and last:
            headers[last] += ' ' + lines[i].strip()
        else:
            last, _, value = lines[i].partition(':')
            headers[last] = value.strip()
        i += 1
    for name in ('From', 'Date', 'Subject'):
        if name not in headers:
            sys.exit(f'{path}: no {name} header')
    subject = headers['Subject']
    if subject.startswith('[PATCH'):
        subject = subject.split(']', 1)[1].strip()
    # The commit message, up to git's "---" line before the diffstat
    body_start = i + 1
    try:
        sep = lines.index('---', body_start)
    except ValueError:
        sys.exit(f'{path}: no "---" line after the commit message')
    body = lines[body_start:sep]
    while body and not body[-1].strip():
        body.pop()
    date = email.utils.parsedate_to_datetime(headers['Date'])

    out = [f'Description: {subject}']
    for line in body:
        out.append(' ' + line if line.strip() else ' .')
    out += [f'Author: {headers["From"]}',
            f'Origin: {origin}',
            'Forwarded: no',
            f'Last-Update: {date.strftime("%Y-%m-%d")}']
    sys.stdout.write('\n'.join(out + lines[sep:]))


if __name__ == '__main__':
    main()
