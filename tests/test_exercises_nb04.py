"""Notebook 04's checkers reject an answer that calls the reference they compare against."""
import logging

import pytest
import torch

from pelib.quant import dequantize_4bit, quantize_4bit


@pytest.fixture(autouse=True)
def notebooks_on_path(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.config.rootpath / "notebooks"))


def test_exercise_1_rejects_bitsandbytes_quantiser():
    from checks.nb04 import exercise_1

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbF

    def via_bnb(W, code, blocksize):
        quant_type = "fp4" if code.min() > -1 else "nf4"
        packed, state = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type)
        return bnbF.dequantize_4bit(packed, state)

    with pytest.raises(AssertionError, match="calls"):
        exercise_1(via_bnb)


def test_exercise_1_rejects_pelib_quantiser_imported_by_name():
    from checks.nb04 import exercise_1

    def via_pelib(W, code, blocksize):  # names bound before the checker runs, as in the notebook
        packed, state = quantize_4bit(W, blocksize, "nf4", double_quant=False)
        return dequantize_4bit(packed, state).view(W.shape)

    with pytest.raises(AssertionError, match="calls"):
        exercise_1(via_pelib)


def test_exercise_3_rejects_the_library_nf4():
    from checks.nb04 import exercise_3
    from solutions.nb04 import nf_code, nf_offset

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbF

    def code_via_bnb(k, offset):
        return bnbF.get_4bit_type("nf4", device="cpu") if k == 4 else nf_code(k, offset)

    with pytest.raises(AssertionError, match="calls"):
        exercise_3((nf_offset, code_via_bnb))
    assert torch.equal(nf_code(4, 0.9677083), bnbF.get_4bit_type("nf4", device="cpu"))
