"""Memory of a QLoRA base: a weight read in place from a mapped checkpoint file leaves the
resident set as soon as it is quantised (pelib.backbone.drop_file_pages), without changing a
value, and never where a write has made a page the process's own."""
import mmap
import struct
import sys

import numpy as np
import pytest
import torch

from pelib.backbone import drop_file_pages
from pelib.quant import Linear4bit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap is Linux's")


def mapped(tmp_path, shape=(512, 1024)):
    """A float32 tensor read in place from a file (a private mapping, as safetensors' load)."""
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "w.bin"
    values.numpy().tofile(path)
    array = np.memmap(path, dtype=np.float32, mode="c", shape=shape)  # copy on write: MAP_PRIVATE
    t = torch.from_numpy(array)
    t.sum()  # read every page: all resident
    return t, values


def resident_pages(t):
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // page), end // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(8 * first)
        flags = struct.unpack(f"{last - first}Q", f.read(8 * (last - first)))
    return sum(bool(v >> 63) for v in flags), last - first


def test_file_pages_leave_memory_and_the_values_stay(tmp_path):
    t, values = mapped(tmp_path)
    present, whole = resident_pages(t)
    assert present == whole > 0
    assert drop_file_pages(t) == whole * mmap.PAGESIZE
    assert resident_pages(t)[0] == 0
    assert torch.equal(t, values)  # read back from the file


def test_a_written_page_is_kept(tmp_path):
    t, values = mapped(tmp_path)
    t[256, 7] = 5.0  # a page in the middle becomes the process's own copy
    assert drop_file_pages(t) == 0
    values[256, 7] = 5.0
    assert torch.equal(t, values)


def test_memory_of_its_own_is_left_alone():
    t = torch.randn(512, 1024)
    ref = t.clone()
    assert drop_file_pages(t) == 0 and torch.equal(t, ref)


def test_linear4bit_from_a_mapped_weight_drops_its_pages(tmp_path):
    t, values = mapped(tmp_path, (384, 1536))
    linear = torch.nn.Linear(1536, 384)
    linear.weight.data = t
    ours = Linear4bit.from_linear(linear)
    assert resident_pages(t)[0] == 0
    linear.weight.data = values  # the same weight in memory of its own: the same bytes
    theirs = Linear4bit.from_linear(linear)
    assert torch.equal(ours.packed, theirs.packed) and torch.equal(ours.qabsmax, theirs.qabsmax)
    assert torch.equal(t, values)
