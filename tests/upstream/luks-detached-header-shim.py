#!/usr/bin/env python3
# (The line above must stay as it is: 7.2's ./check runs a test with its
# python only when the test's first line is exactly that.)
"""Upstream QEMU's iotest tests/luks-detached-header (10.2), run by 7.2's
./check and iotests.py.

tests/upstream-luks-detached-header.py copies this file into a scratch
iotests directory as tests/luks-detached-header, beside the upstream test,
unchanged, as luks-detached-header.upstream and its expected output as
luks-detached-header.out.  This file adapts 7.2's iotests where its
python/qemu differs from 10.2's, then runs the upstream test as
__main__, as ./check would run it: its test methods, assertions and
expected output are upstream's, untouched.

UPSTREAM_SHIM_PROBE_PAYLOAD=off (run 2 of the suite) also turns the
series' payload check off in every detached-header luks node the test
opens; unset (run 1), the test runs as is.

Not adapted, because 7.2 does what upstream does: relaunching a VM
object (setUp shuts its VM down, test_detached_luks_header launches the
same object again; 7.2's QEMUMachine makes a new QMP connection and qtest
socket at every launch), and tearDown's self.vm.get_log(), which is None
in both while a VM that a failed test left running is still up.
"""

import itertools
import json
import os
import runpy

import iotests   # 7.2's, first on the PYTHONPATH that ./check sets

# The upstream test, beside this file (the scratch copy), run unchanged.
UPSTREAM = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'luks-detached-header.upstream')
# Run 2 only: the series' option that turns its payload check off
# (qapi/block-core.json, BlockdevOptionsLUKS).
PROBE_OFF = os.environ.get('UPSTREAM_SHIM_PROBE_PAYLOAD') == 'off'
OPTION = '__org.example_probe-payload'

# A number for each VM of the process, for its name (below).
vm_numbers = itertools.count()


def detached_luks(options):
    """Whether blockdev options (keys as QMP spells them) are those of a
    luks node with a detached header: the nodes the payload check runs
    on, and the only ones that take OPTION."""
    return options.get('driver') == 'luks' and 'header' in options


class VM(iotests.VM):
    """iotests.VM, as the test makes it with iotests.VM()."""

    def __init__(self, path_suffix=''):
        # 7.2's QEMUQtestMachine listens for qtest on a socket file named
        # after the VM, SOCK_DIR/qemu<path_suffix>-<pid>-qtest.sock: the
        # same path for every iotests.VM() of the process, where 10.2's
        # uses a socketpair and no file.  A test that fails leaves its VM
        # running (upstream's tearDown doesn't shut it down), that VM
        # keeps the path bound, and the next test's setUp can't launch
        # its own ("Address already in use"), which would fail a case
        # that upstream runs.  A number per VM gives each its own path.
        super().__init__(path_suffix=f'{path_suffix}-{next(vm_numbers)}')

    def qmp(self, cmd, args_dict=None, conv_keys=None, **args):
        if PROBE_OFF and cmd == 'blockdev-add' and args_dict is None:
            # Run 2: blockdev-add of a detached-header luks node also
            # gets OPTION: false.  The test passes its arguments as
            # keywords, whose '_' QEMUMachine.qmp() turns into '-' (so
            # OPTION can't be one of them): convert them as qmp() would,
            # add OPTION, and send them as they are.
            args_dict = self._qmp_args(conv_keys is not False, args)
            if detached_luks(args_dict):
                args_dict[OPTION] = False
            return super().qmp(cmd, args_dict=args_dict)
        return super().qmp(cmd, args_dict=args_dict, conv_keys=conv_keys,
                           **args)


def qemu_img(*args, **kwargs):
    # Run 2: a json: filename of a detached-header luks volume (the test
    # gives two to qemu-img info) also gets OPTION: false.  Every qemu-img
    # command of iotests.py goes through iotests.qemu_img.
    if PROBE_OFF:
        args = list(args)
        for i, arg in enumerate(args):
            if isinstance(arg, str) and arg.startswith('json:'):
                options = json.loads(arg[len('json:'):])
                if detached_luks(options):
                    options[OPTION] = False
                    args[i] = 'json:' + json.dumps(options)
    return qemu_img_72(*args, **kwargs)


qemu_img_72 = iotests.qemu_img
iotests.VM = VM            # the test calls iotests.VM() in setUp
iotests.qemu_img = qemu_img

# The upstream test as __main__, as ./check runs a test: its last lines
# call iotests.main(), which runs its QMPTestCase methods with 7.2's
# unittest runner and prints what its .out expects.
runpy.run_path(UPSTREAM, run_name='__main__')
