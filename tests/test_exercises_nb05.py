"""Notebook 05's checkers reject an answer that calls the library they compare against."""
import pytest

from pelib.quant import QuantState, bits_per_param, dequantize_4bit, quantize_4bit


@pytest.fixture(autouse=True)
def notebooks_on_path(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.config.rootpath / "notebooks"))


def test_exercise_1_rejects_pelib_decoding():
    from checks.nb05 import exercise_1

    def via_pelib(qabsmax, absmax2, offset, code2):
        st = QuantState(shape=(qabsmax.numel(),), dtype=None, blocksize=64, quant_type="nf4", code=None)
        st.qabsmax, st.absmax2, st.offset, st.code2 = qabsmax, absmax2, offset, code2
        return st.block_absmax()

    with pytest.raises(AssertionError, match="calls"):
        exercise_1(via_pelib)


def test_exercise_3_rejects_pelib_quantiser_imported_by_name():
    from checks.nb05 import exercise_3

    def via_pelib(W, blocksizes):
        out = {}
        for B in blocksizes:
            packed, st = quantize_4bit(W, B, "nf4", double_quant=True, dq_rounding="nearest")
            out[B] = (bits_per_param(packed, st), (dequantize_4bit(packed, st).view_as(W) - W).abs().mean())
        return out

    with pytest.raises(AssertionError, match="calls"):
        exercise_3(via_pelib)
