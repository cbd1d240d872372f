# Shared settings and helpers of the scripts: the entry points in scripts/
# source it as scripts/lib/lib.sh, the stages and suite runners beside it
# here.  Source it; don't run it.
# shellcheck shell=bash

TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../../source.conf
. "$TOP/source.conf"

# The tests of this repository point these elsewhere to try the scripts on
# scratch copies; normal use never sets them.
DOWNLOADS=${QEMU_LUKS_DOWNLOADS:-$TOP/downloads}
BUILD=${QEMU_LUKS_BUILD:-$TOP/build}
PATCHES=${QEMU_LUKS_PATCHES:-$TOP/patches}
SRC=$BUILD/qemu          # git work tree: debian-base + our series
OBJ=$BUILD/obj           # out-of-tree build directory
STAMP=$BUILD/series.stamp

# The binaries that scripts/build makes (and scripts/check-series at each
# patch), as ninja targets of build/obj.
BINARIES=(qemu-system-x86_64 qemu-img qemu-io qemu-nbd
          storage-daemon/qemu-storage-daemon)

msg() { printf '==> %s\n' "$*" >&2; }
# Minutes:seconds since the script started.
elapsed() { printf '%d:%02d' $((SECONDS / 60)) $((SECONDS % 60)); }

# Show the progress of ninja, whose output comes on stdin: its [N/M]
# counter on one updating line if stderr is a terminal, else a line at
# every tenth of the steps.
ninja_progress() {
    local line n= m tenth shown=-1
    while IFS= read -r line; do
        [[ $line =~ ^\[([0-9]+)/([0-9]+)\]\  ]] || continue
        n=${BASH_REMATCH[1]} m=${BASH_REMATCH[2]}
        if [ -t 2 ]; then
            printf '\r==> [%s] compiling [%d/%d]' "$(elapsed)" "$n" "$m" >&2
        else
            tenth=$((n * 10 / m))
            if [ "$tenth" -ne "$shown" ]; then
                shown=$tenth
                msg "[$(elapsed)] compiling [$n/$m]"
            fi
        fi
    done
    if [ -t 2 ] && [ -n "$n" ]; then printf '\n' >&2; fi
}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Fixed identity and dates, so the debian-base commit is the same everywhere.
git_fixed() {
    GIT_AUTHOR_NAME='Debian base' GIT_AUTHOR_EMAIL='base@localhost' \
    GIT_COMMITTER_NAME='Debian base' GIT_COMMITTER_EMAIL='base@localhost' \
    GIT_AUTHOR_DATE='2000-01-01T00:00:00Z' GIT_COMMITTER_DATE='2000-01-01T00:00:00Z' \
    git "$@"
}

# The entries of a list file such as tests/unit.list: its lines without
# comments ("#" to the end of the line) and without blank lines.
list_lines() {
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$1"
}

# The patch files of the series, in order, one per line.
series_files() {
    [ -f "$PATCHES/series" ] || return 0
    list_lines "$PATCHES/series"
}

# Run QEMU's scripts/checkpatch.pl of the work tree $1 on the patch file $2
# and print what it says.  Fails if it fails or warns: warnings count.
checkpatch() {
    local out rc
    out=$(cd "$1" && ./scripts/checkpatch.pl "$2" 2>&1)
    rc=$?
    printf '%s\n' "$out"
    [ "$rc" -eq 0 ] && ! grep -qE '^(ERROR|WARNING)' <<<"$out"
}

# Run from the build tree $1, QEMU looks for the firmware directories of
# --firmwarepath under $1/qemu-bundle/: point them at Debian's.
link_firmware() {
    local d
    for d in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
        [ -d "$d" ] || continue
        mkdir -p "$(dirname "$1/qemu-bundle$d")"
        ln -sfn "$d" "$1/qemu-bundle$d"
    done
}

# Print series $2 with the comment and blank lines of series $1 carried
# over: each block of them stays before the patch it preceded, recognised
# by its name without the number, so that a topic heading survives the
# renumbering of an export.  A block whose patch is gone goes before the
# next patch of $1 that is still there, with a warning.
carry_series_comments() {
    /usr/bin/python3 - "$1" "$2" <<'EOF'
import re
import sys

old, new = sys.argv[1:]


def slug(name):
    return re.sub(r'^[0-9]+-', '', name)


try:
    with open(old) as f:
        lines = f.read().splitlines()
except FileNotFoundError:
    lines = []
with open(new) as f:
    present = {slug(p) for p in f.read().splitlines()}
before, pending = {}, []
for line in lines:
    if line.startswith('#') or not line.strip():
        pending.append(line)
    elif slug(line) in present:
        before[slug(line)] = pending
        pending = []
    elif pending:
        print(f'series: {line} is gone; the comments before it move to '
              f'the next patch', file=sys.stderr)
with open(new) as f:
    for p in f.read().splitlines():
        for line in before.pop(slug(p), []):
            print(line)
        print(p)
for line in pending:
    print(line)
EOF
}

# Write debian-base..HEAD of the work tree as a stable patch series into $1.
# Stable: no commit hashes, no numbering in subjects, no git version trailer,
# so an unchanged commit exports to a byte-identical file.
export_series_to() {
    local out=$1
    mkdir -p "$out"
    git -C "$SRC" format-patch -q --zero-commit --no-signature -N --stat=72 \
        -o "$out" debian-base..HEAD >/dev/null || return 1
    (cd "$out" && ls -1 -- *.patch 2>/dev/null) > "$out/series" || true
}
