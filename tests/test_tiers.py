"""The unit tier's guard (conftest.py): a test with no tier mark cannot start a process or run a
Triton kernel in the interpreter; a test marked integration can."""
import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MESSAGE = "a unit test may not .*: mark the file `pytestmark = pytest.mark.integration`"


def _copy(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs))


def _launch():
    """One interpreted launch, whether or not the suite runs Triton in the interpreter."""
    x, y = torch.arange(8.0), torch.zeros(8)
    InterpretedFunction(_copy)[(1,)](x, y, N=8)
    return y, x


def test_a_unit_test_may_not_start_a_subprocess():
    with pytest.raises(RuntimeError, match=MESSAGE):
        subprocess.run([sys.executable, "-c", "pass"])
    with pytest.raises(RuntimeError, match=MESSAGE):
        os.system("true")
    with pytest.raises(RuntimeError, match=MESSAGE):
        os.fork()


def test_a_unit_test_may_not_start_a_multiprocessing_process():
    import multiprocessing

    with pytest.raises(RuntimeError, match=MESSAGE):
        multiprocessing.get_context("spawn").Process(target=print).start()


def test_a_unit_test_may_not_run_a_triton_kernel_in_the_interpreter():
    with pytest.raises(RuntimeError, match=MESSAGE):
        _launch()


@pytest.mark.integration
def test_an_integration_test_may():
    """The same calls pass under the integration mark (the kernel copies x into y)."""
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0
    y, x = _launch()
    assert torch.equal(y, x)
