"""The code maps equal bitsandbytes' tables bit for bit, and the arithmetic that makes them so."""
import logging

import pytest
import torch

from pelib.quant import NF4_OFFSET, create_dynamic_map, create_fp4_map, create_int4_map, create_normal_map

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU import logs a warning
bnbF = pytest.importorskip("bitsandbytes.functional")


def test_nf4_equals_bitsandbytes():
    code = create_normal_map()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(code, bnbF.get_4bit_type("nf4", device="cpu"))
    assert code[0] == -1 and code[-1] == 1 and code[7] == 0  # 7 negative, zero, 8 positive


@pytest.mark.parametrize("use_extra_value", [True, False])
def test_normal_map_equals_bitsandbytes_construction(use_extra_value):
    ours = create_normal_map(use_extra_value=use_extra_value)
    theirs = bnbF.create_normal_map(use_extra_value=use_extra_value)  # 256 values, zero padded
    assert torch.equal(ours[ours != 0], theirs[theirs != 0])


def test_nf4_needs_float32_linspace():
    """The same quantiles from float64 probabilities land on other float32 values."""
    from scipy.stats import norm

    pos = norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1].numpy())
    v64 = torch.tensor([*pos, 0.0, *neg], dtype=torch.float64).sort().values
    v64 = (v64 / v64.max()).float()
    assert not torch.equal(v64, create_normal_map())
    assert torch.allclose(v64, create_normal_map(), atol=1e-6)


def test_normal_map_builds_without_scipy(monkeypatch):
    """The quantiles come from torch: a QLoRA run need not import scipy.stats (tens of MB)."""
    import sys

    for name in [m for m in sys.modules if m == "scipy" or m.startswith("scipy.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import scipy...` now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy", None)
    assert torch.equal(create_normal_map(), bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("offset", [0.9, 0.95, 0.99, 0.999])
@pytest.mark.parametrize("use_extra_value", [True, False])
def test_normal_map_equals_scipy_quantiles(offset, use_extra_value):
    """torch.special.ndtri and scipy's norm.ppf round to the same float32 codes."""
    from scipy.stats import norm

    n_pos = 8 if use_extra_value else 7
    pos = norm.ppf(torch.linspace(offset, 0.5, n_pos + 1)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())
    v = torch.tensor([*pos, *[0.0] * (9 - n_pos), *neg], dtype=torch.float32).sort().values
    assert torch.equal(create_normal_map(offset, use_extra_value), v / v.max())


def test_nf4_offset_is_mean_of_two_bin_centres():
    assert abs((1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2 - NF4_OFFSET) < 5e-8


def test_fp4_equals_bitsandbytes():
    assert torch.equal(create_fp4_map(), bnbF.get_4bit_type("fp4", device="cpu"))


def test_int4_grid():
    code = create_int4_map()
    assert code.shape == (15,) and torch.equal(code, -code.flip(0)) and code[7] == 0


@pytest.mark.parametrize("args", [(True, 7, 8), (False, 7, 8), (True, 6, 8), (True, 4, 8)])
def test_dynamic_map_equals_bitsandbytes(args):
    assert torch.equal(create_dynamic_map(*args), bnbF.create_dynamic_map(*args))


def test_dynamic_map_default():
    code = create_dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert code[-1] == 1.0 and (code == 0).sum() == 1 and torch.all(code[1:] > code[:-1])
