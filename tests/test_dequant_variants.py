"""tools/dequant_variants.py: its hand-threaded variant writes the reference's bits."""
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pelib.quant.blockwise import dequantize_4bit_ref, quantize_4bit

TOOL = Path(__file__).parents[1] / "tools" / "dequant_variants.py"
spec = importlib.util.spec_from_file_location("dequant_variants", TOOL)
variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(variants)


@pytest.mark.parametrize("chunk", [32, 8192])  # many chunks a thread, and one
def test_threaded_by_blocks_equals_the_reference(chunk):
    torch.manual_seed(0)
    packed, state = quantize_4bit(torch.randn(192, 320), 64, "nf4", True)
    out = torch.full((192, 320), float("nan"))
    with ThreadPoolExecutor(2) as pool:
        variants.threaded_by_blocks(packed, state.block_absmax(), state.code, out, chunk, pool)
    assert torch.equal(out, dequantize_4bit_ref(packed, state))
