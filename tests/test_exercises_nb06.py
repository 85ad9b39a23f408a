"""Notebook 06's checkers reject an answer that calls the reference they compare against."""
import pytest
import torch.nn.functional as F

from pelib.quant import Dequant4bitLinear


@pytest.fixture(autouse=True)
def notebooks_on_path(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.config.rootpath / "notebooks"))


def test_exercise_1_rejects_pelib_4bit_function_and_restores_it():
    from checks.nb06 import exercise_1

    forward = Dequant4bitLinear.__dict__["forward"]

    def via_pelib(x, A, B, packed, state, scaling):
        return Dequant4bitLinear.apply(x, packed, state, None) + scaling * F.linear(F.linear(x, A), B)

    with pytest.raises(AssertionError, match="Dequant4bitLinear"):
        exercise_1(via_pelib)
    assert Dequant4bitLinear.__dict__["forward"] is forward  # put back as it was


def test_exercise_2_rejects_peft_loftq():
    from checks.nb06 import exercise_2

    def via_peft(W, r, steps):
        import peft.utils.loftq_utils as loftq_utils

        return loftq_utils.loftq_init(W, num_bits=4, reduced_rank=r, num_iter=steps)

    with pytest.raises(AssertionError, match="calls"):
        exercise_2(via_peft)


def test_exercise_3_rejects_pelib_ledger():
    from checks.nb06 import exercise_3

    def via_pelib(shapes, r):
        import pelib.quant

        return dict(frozen=sum(pelib.quant.quantized_nbytes(o * i) for o, i in shapes),
                    lora=sum(16 * r * (o + i) for o, i in shapes))

    with pytest.raises(AssertionError, match="calls"):
        exercise_3(via_pelib)


def test_exercise_3_rejects_a_model_built_by_apply_qlora():
    """The notebook imports apply_qlora and qlora_nbytes by name; the answer builds the layers,
    quantises them with pelib and counts their bytes."""
    from checks.nb06 import exercise_3
    from torch import nn

    from pelib.quant import apply_qlora, qlora_nbytes

    def via_pelib_model(shapes, r):
        model = nn.Sequential(*[nn.Linear(i, o, bias=False) for o, i in shapes])
        apply_qlora(model, [str(k) for k in range(len(shapes))], r=r)
        nbytes = qlora_nbytes(model)
        return dict(frozen=nbytes["packed"] + nbytes["scales"], lora=sum(16 * r * (o + i) for o, i in shapes))

    from pelib.quant.ledger import quantized_nbytes

    shapes = [(192, 576), (77, 383)]
    assert via_pelib_model(shapes, 2)["frozen"] == sum(quantized_nbytes(o * i, 64, double_quant=True)
                                                       for o, i in shapes)  # right outside the checker
    with pytest.raises(AssertionError, match="calls"):
        exercise_3(via_pelib_model)
