#!/usr/bin/python3
"""The LUKS header fuzz target of the series, fuzz-crypto-luks, as
scripts/lib/build-fuzz builds it in build/fuzz (libFuzzer, ASan, UBSan).

  1. The checked-in corpus replays in both modes of the target (no-io:
     header parsing only, as qemu-img info; unlock: with the target's
     passphrase, through key derivation, AF merge, digest and cipher
     setup): no input crashes, every seed of tests/fuzz/seeds/ opens, and
     unlocks in the unlock mode, so that the seeds keep leading the
     fuzzer deep (those named refused-* must be refused instead).
     tests/fuzz/regressions/ holds the reproducers of past findings,
     made by tests/fuzz/make-seeds.py, which the same checks apply to
     (refused-unlock-* must open in the no-io mode, and not unlock).
  2. Each mode is fuzzed for a fixed time (QEMU_LUKS_FUZZ_SECONDS, 90 s by
     default) from that corpus and the dictionary tests/fuzz/luks.dict,
     with a random seed (QEMU_LUKS_FUZZ_SEED sets it).
     A crash, a leak, a timeout or running out of memory fails the test;
     libFuzzer's reproducer is kept in build/fuzz-crashes/, named after
     the mode.  The executions and the edge coverage of the LUKS1 and
     LUKS2 code are printed as diagnostics.

The corpus is stored xz-compressed and unpacked into build/fuzz/corpus/;
what the fuzzer adds goes to build/fuzz/work-MODE/, kept from run to run.
Prints TAP.
"""

import glob
import lzma
import os
import re
import shutil
import time

from proc import BUILD, TOP, run
from tap import check, diag, tap

FUZZ = os.path.join(BUILD, 'fuzz')
TARGET = os.path.join(FUZZ, 'tests', 'fuzz', 'fuzz-crypto-luks')
CRASHES = os.path.join(BUILD, 'fuzz-crashes')
CORPUS = os.path.join(FUZZ, 'corpus')
HERE = os.path.join(TOP, 'tests', 'fuzz')
DICT = os.path.join(HERE, 'luks.dict')
MODES = ('no-io', 'unlock')
SECONDS = int(os.environ.get('QEMU_LUKS_FUZZ_SECONDS', '90'))

# The files whose edge coverage is reported
COVERAGE_FILES = ('crypto/block-luks.c', 'crypto/block-luks2.c')

# Sanitizers: stop at the first report, with symbols if llvm-symbolizer is
# there; leaks are reported by libFuzzer per input
SYMBOLIZER = shutil.which('llvm-symbolizer-14') or shutil.which('llvm-symbolizer')
ENV = dict(os.environ,
           ASAN_OPTIONS='abort_on_error=0:detect_leaks=1:allocator_may_return_null=1',
           UBSAN_OPTIONS='halt_on_error=1:print_stacktrace=1',
           LC_ALL='C')
if SYMBOLIZER:
    ENV['ASAN_SYMBOLIZER_PATH'] = SYMBOLIZER


def unpack(kind):
    """Unpack tests/fuzz/KIND/*.xz into build/fuzz/corpus/KIND; returns the
    paths, sorted"""
    out = os.path.join(CORPUS, kind)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    paths = []
    for xz in sorted(glob.glob(os.path.join(HERE, kind, '*.xz'))):
        path = os.path.join(out, os.path.basename(xz)[:-len('.xz')])
        with lzma.open(xz) as f, open(path, 'wb') as g:
            shutil.copyfileobj(f, g)
        paths.append(path)
    return out, paths


def sanitizer_report(out):
    """The lines of a crash report worth showing: the error and the top
    frames"""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if re.search(r'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|'
                     r'ALARM: working on the last Unit|out-of-memory', line):
            return '\n'.join(lines[i:i + 30])
    return '\n'.join(lines[-30:])


def replay(mode, path, kind):
    """Run one corpus file (a seed or a regression, says kind) in a mode:
    no crash; it must open, and unlock in the unlock mode, unless its name
    says QEMU refuses it"""
    name = os.path.basename(path)
    r = run([TARGET, '--mode=' + mode, '--verbose', '-timeout=30', path], timeout=120, env=ENV)
    crashed = r.rc != 0
    outcome = re.search(r'^(info: opened( and unlocked)?|not opened: .*)$', r.out, re.M)
    if name.startswith('refused-unlock-') and mode == 'no-io':
        want = 'opened'
        ok = outcome and outcome.group(0) == 'info: opened'
    elif name.startswith('refused-'):
        want = 'refused'
        ok = outcome and outcome.group(0).startswith('not opened: ')
    else:
        want = 'opened and unlocked' if mode == 'unlock' else 'opened'
        ok = outcome and outcome.group(0) == 'info: ' + want
    why = sanitizer_report(r.out) if crashed else outcome.group(0) if outcome else r.out
    check(not crashed and ok, 'replay %s %s (%s): %s, no crash' % (kind, name, mode, want), why)


def coverage(out):
    """{file: [covered edges, edges, functions reached, functions, edges of
    the functions reached]} of COVERAGE_FILES, from the output of
    -print_coverage=1.  The edges are SanitizerCoverage's, which include
    the branches to the sanitizers' reports; the files also hold code that
    opening a volume never runs (creating, amending, encrypting), hence
    the coverage within the functions reached."""
    cov = {f: [0, 0, 0, 0, 0] for f in COVERAGE_FILES}
    for m in re.finditer(r'^((?:UN)?COVERED)_FUNC: hits: \d+ edges: (\d+)/(\d+) \S+ (\S+):\d+',
                         out, re.M):
        for f in COVERAGE_FILES:
            if m.group(4).endswith('/' + f):
                c = cov[f]
                c[0] += int(m.group(2))
                c[1] += int(m.group(3))
                c[3] += 1
                if m.group(1) == 'COVERED':
                    c[2] += 1
                    c[4] += int(m.group(3))
    return cov


def fuzz(mode, corpus_dirs, max_len):
    """Fuzz one mode for SECONDS; a finding fails, its reproducer kept"""
    work = os.path.join(FUZZ, 'work-' + mode)
    os.makedirs(work, exist_ok=True)
    os.makedirs(CRASHES, exist_ok=True)
    before = set(os.listdir(CRASHES))
    log = os.path.join(FUZZ, 'fuzz-%s.log' % mode)
    args = [TARGET, '--mode=' + mode, '-dict=' + DICT,
            '-max_total_time=%d' % SECONDS, '-max_len=%d' % max_len,
            '-timeout=10', '-rss_limit_mb=2048',
            '-malloc_limit_mb=1024', '-close_fd_mask=2', '-print_final_stats=1',
            '-print_coverage=1', '-artifact_prefix=%s/%s-' % (CRASHES, mode)]
    if os.environ.get('QEMU_LUKS_FUZZ_SEED'):
        args.append('-seed=' + os.environ['QEMU_LUKS_FUZZ_SEED'])
    args += [work] + corpus_dirs
    t0 = time.time()
    r = run(args, timeout=SECONDS + 300, env=ENV)
    secs = time.time() - t0
    with open(log, 'w') as f:
        f.write(str(r))
    found = sorted(set(os.listdir(CRASHES)) - before)
    execs = re.search(r'^stat::number_of_executed_units: (\d+)', r.out, re.M)
    done = re.findall(r'^#\d+\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)', r.out, re.M)
    summary = '%s runs in %.0f s' % (execs.group(1) if execs else '?', secs)
    if execs and secs:
        summary += ' (%d/s)' % (int(execs.group(1)) / secs)
    if done:
        summary += ', cov %s, ft %s, corpus %s' % done[-1]
    why = ''
    if r.rc != 0 or found:
        seed = re.search(r'^INFO: Seed: (\d+)', r.out, re.M)
        why = sanitizer_report(r.out) + '\nreproducers: %s\nrun one with: %s --mode=%s FILE' % (
            ', '.join(os.path.join(CRASHES, f) for f in found) or 'none written',
            TARGET, mode)
        why += '\nlibFuzzer seed %s (QEMU_LUKS_FUZZ_SEED=%s starts a run from it again)' % (
            (seed.group(1),) * 2 if seed else ('?', '?'))
    check(r.rc == 0 and not found and execs,
          'fuzz %s for %d s: no finding; %s' % (mode, SECONDS, summary), why)
    for f, (covered, total, funcs, all_funcs, reached) in coverage(r.out).items():
        diag('%s: %s: %d/%d edges (%.0f%%); %d/%d (%.0f%%) in the %d/%d functions reached' % (
            mode, f, covered, total, 100.0 * covered / max(total, 1),
            covered, reached, 100.0 * covered / max(reached, 1), funcs, all_funcs))


def main():
    if not check(os.access(TARGET, os.X_OK), 'the fuzz target is built',
                 '%s is missing: run scripts/build (or scripts/lib/build-fuzz)' % TARGET):
        tap.done()
    seeds_dir, seeds = unpack('seeds')
    regressions_dir, regressions = unpack('regressions')
    check(seeds, 'the seed corpus is there (%d seeds)' % len(seeds))
    check(regressions, 'the regressions are there (%d)' % len(regressions))
    for mode in MODES:
        for path in seeds:
            replay(mode, path, 'seed')
        for path in regressions:
            replay(mode, path, 'regression')
    # libFuzzer would cut inputs to 1 MiB, less than a LUKS1 header with
    # 256-bit keys takes
    max_len = max(os.path.getsize(p) for p in seeds + regressions)
    for mode in MODES:
        fuzz(mode, [seeds_dir, regressions_dir], max_len)
    tap.done()


main()
