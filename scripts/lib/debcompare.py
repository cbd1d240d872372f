#!/usr/bin/python3
"""Compare one of Debian's .debs with ours, part of scripts/package --check.

  debcompare.py STOCK.deb OURS.deb

Prints what differs, and fails unless that is only what the series and
its packaging change:
  - files: none, but for Debian's changelog.Debian.<arch>.gz, the entry of
    its binNMU (+bN), which our build has no reason for;
  - control fields: Version, Source and Installed-Size aside, the same,
    once each side's own version is read as "VERSION"; in the
    dependencies, libnettle8, libhogweed6 and libgmp10 (nettle's) may give
    way to libgcrypt20 (packaging/debian/crypto-gcrypt.patch).
"""

import re
import subprocess
import sys

IGNORED = {'Version', 'Source', 'Installed-Size'}
RELATIONS = {'Depends', 'Pre-Depends', 'Recommends', 'Suggests', 'Breaks',
             'Replaces', 'Conflicts', 'Provides', 'Enhances'}
GONE_OK = {'libnettle8', 'libhogweed6', 'libgmp10'}
NEW_OK = {'libgcrypt20'}


def deb(*args):
    return subprocess.run(['dpkg-deb', *args], check=True,
                          capture_output=True, text=True).stdout


def files(path):
    """The paths of the data of @path, with their type and mode"""
    out = set()
    for line in deb('-c', path).splitlines():
        mode, _, _, _, _, name = line.split(None, 5)
        out.add(f'{mode} {name.split(" -> ")[0]}')
    return out


def control(path):
    """The control fields of @path"""
    fields, name = {}, None
    for line in deb('-f', path).splitlines():
        if line[:1] in (' ', '\t') and name:
            fields[name] += '\n' + line
        else:
            name, _, value = line.partition(':')
            fields[name] = value.strip()
    return fields


def relation(value, version):
    """A relationship field as a set of its alternatives' groups, with
    @version read as VERSION"""
    value = value.replace(version, 'VERSION')
    return {re.sub(r'\s+', ' ', item.strip())
            for item in value.split(',') if item.strip()}


def name_of(item):
    return item.split()[0]


def main():
    stock, ours = sys.argv[1:]
    bad = False
    sf, of = files(stock), files(ours)
    sc, oc = control(stock), control(ours)
    for f in sorted(sf - of):
        ok = re.search(r'/changelog\.Debian\.[a-z0-9]+\.gz$', f)
        print(f'only in Debian\'s: {f}{"  (its binNMU entry)" if ok else ""}')
        bad |= not ok
    for f in sorted(of - sf):
        print(f'only in ours: {f}')
        bad = True
    for name in sorted(set(sc) | set(oc)):
        if name in IGNORED:
            continue
        a, b = sc.get(name, ''), oc.get(name, '')
        if name in RELATIONS:
            ra = relation(a, sc['Version'])
            rb = relation(b, oc['Version'])
            for item in sorted(ra - rb):
                ok = name == 'Depends' and name_of(item) in GONE_OK
                print(f'{name}: Debian\'s only: {item}'
                      f'{"  (nettle, for libgcrypt)" if ok else ""}')
                bad |= not ok
            for item in sorted(rb - ra):
                ok = name == 'Depends' and name_of(item) in NEW_OK
                print(f'{name}: ours only: {item}'
                      f'{"  (for nettle)" if ok else ""}')
                bad |= not ok
        elif a.replace(sc['Version'], 'VERSION') != \
                b.replace(oc['Version'], 'VERSION'):
            print(f'{name}: Debian\'s {a!r}, ours {b!r}')
            bad = True
    sys.exit(1 if bad else 0)


if __name__ == '__main__':
    main()
