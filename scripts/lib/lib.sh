# Shared settings for the scripts in this directory.  Source it; don't run it.
# shellcheck shell=bash

TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=../source.conf
. "$TOP/source.conf"

# The tests of this repository point these elsewhere to try the scripts on
# scratch copies; normal use never sets them.
DOWNLOADS=${QEMU_LUKS_DOWNLOADS:-$TOP/downloads}
BUILD=${QEMU_LUKS_BUILD:-$TOP/build}
PATCHES=${QEMU_LUKS_PATCHES:-$TOP/patches}
SRC=$BUILD/qemu          # git work tree: debian-base + our series
OBJ=$BUILD/obj           # out-of-tree build directory
STAMP=$BUILD/series.stamp

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

# The patch files of the series, in order, one per line.
series_files() {
    [ -f "$PATCHES/series" ] || return 0
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' "$PATCHES/series"
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
