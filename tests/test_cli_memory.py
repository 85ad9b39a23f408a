"""The command line's training runs give freed tensors back to the OS (glibc's mmap threshold is
fixed), so a run's peak RSS follows the memory in use instead of the heap's fragmentation."""
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration,  # starts subprocesses
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")]

# Frees a 4 MiB tensor, then allocates another: is the second one in pages of its own (mmapped)?
PROBE = """
import ctypes, sys, torch
from pelib.__main__ import return_freed_memory
if sys.argv[1] == "fixed":
    return_freed_memory()
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
a = torch.ones(1 << 20)  # 4 MiB
del a  # glibc (dynamic threshold) now serves 4 MiB from its heap
before = libc.mallinfo2().hblkhd
b = torch.ones(1 << 20)
print(libc.mallinfo2().hblkhd - before >= b.numel() * 4)
"""


def mmapped(mode: str) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # glibc's default
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def test_a_freed_tensor_goes_back_to_the_os():
    assert mmapped("fixed")  # after return_freed_memory: its own pages, unmapped when freed
    assert not mmapped("default")  # glibc's default: from the heap, which keeps freed pages
