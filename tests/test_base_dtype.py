"""`pelib finetune --base-dtype`: the frozen base stored in bf16 when training runs in bf16
(auto), kept in fp32 otherwise or when asked; a bf16 base without bf16 training is refused."""
import json
from unittest import mock

import pytest
import torch

import pelib
from pelib import finetune as ft
from pelib.backbone import load_tokenizer
from pelib.train import TrainConfig

TINY = ["--tiny", "--train-limit", "16", "--batch-size", "8", "--max-length", "16"]


def built(method, *argv, model="smollm2"):
    args = ft.parse(["--model", model, "--method", method, *TINY, *argv])
    ft.check(args)
    cfg = TrainConfig.of(ft.config_of(args), batch_size=8, max_length=16, bf16=ft.uses_bf16(args))
    return ft.build(args, cfg)[0], args


@pytest.mark.parametrize("method", ["lora", "qlora", "head"])
def test_with_bf16_the_frozen_weights_are_bf16_and_the_trainable_fp32(method):
    extra = ["--r", "4"] if method != "head" else []
    model, args = built(method, "--bf16", *extra)  # --base-dtype auto
    assert ft.bf16_base(args)
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    # the norms' few numbers stay fp32 (pelib.backbone.cast_frozen says why)
    assert frozen and all(p.dtype == (torch.float32 if n.endswith("norm.weight") else torch.bfloat16)
                          for n, p in frozen if p.is_floating_point())
    assert any(n.endswith("norm.weight") for n, _ in frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # buffers keep theirs: RoPE's frequencies, and for QLoRA the 4-bit bytes and their fp32 scales
    buffers = dict(model.named_buffers())
    assert buffers["model.rotary_emb.inv_freq"].dtype == torch.float32
    if method == "qlora":
        q = model.model.layers[0].self_attn.q_proj.base_layer
        assert q.packed.dtype == torch.uint8 and q.absmax2.dtype == torch.float32
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # not quantised: bf16


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_loss_on_a_bf16_base_is_close_to_the_fp32_bases_under_autocast(method):
    bf16, _ = built(method, "--bf16", "--r", "4")
    fp32, _ = built(method, "--bf16", "--r", "4", "--base-dtype", "fp32")
    assert fp32.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(5, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 1, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = (m(input_ids=ids, labels=y).loss.float() for m in (bf16, fp32))
    exact = fp32(input_ids=ids, labels=y).loss  # fp32 throughout: autocast's own error, for scale
    # The linears computed in bf16 before (autocast casts their weights on every forward), so the
    # difference is where bf16 was not used: the embeddings and norm weights, each rounded once
    # to 8 significant bits (relative error <= 2**-9), and a residual stream that now starts in
    # bf16. The loss (near log(77) = 4.34: 77 Banking77 classes, a random head) may move by a
    # few such roundings of the activations; 2e-2 is one bf16 step (2**-8) of the loss itself.
    assert abs(a - b) < 2e-2, (a, b)
    assert abs(b - exact) < 2e-2  # the fp32 base under autocast: the same scale of error


def test_fp32_training_keeps_the_base_in_fp32():
    with mock.patch.object(ft, "cpu_has_fast_bf16", lambda: False):
        model, args = built("lora", "--r", "4")  # auto, no bf16 hardware: fp32 training
        assert not ft.uses_bf16(args) and not ft.bf16_base(args)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model, args = built("lora", "--r", "4", "--bf16", "--base-dtype", "fp32")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_bf16_base_without_bf16_training_is_refused_with_the_fix():
    def refused(*argv):
        args = ft.parse(["--method", "lora", *TINY, *argv])
        with pytest.raises(ValueError) as e:
            ft.check(args)
            ft.bf16_base(args)
        return str(e.value)

    assert "drop --fp32" in refused("--base-dtype", "bf16", "--fp32")
    with mock.patch.object(ft, "cpu_has_fast_bf16", lambda: False):
        assert "add --bf16" in refused("--base-dtype", "bf16")
    assert "drop --base-dtype" in refused("--base-dtype", "bf16", "--method", "full")


def test_the_ledger_counts_a_bf16_base_at_two_bytes_a_weight():
    from pelib.runs import run_ledger

    model, args = built("lora", "--bf16", "--r", "4")
    cfg = TrainConfig.of(ft.config_of(args), batch_size=8, max_length=16, bf16=True)
    data = pelib.load_nlu(args.data, "train", limit=16, seed=0)
    led = run_ledger(model, load_tokenizer(args.model), data, cfg)["bytes"]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16, torch.float32}  # weights, norms
    assert led["frozen weights"] == sum(p.numel() * p.element_size() for p in frozen) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert led["trainable (adapter + head)"] == led["gradients"] == 4 * trainable


@pytest.mark.integration  # two tiny runs through the command line
def test_an_fp32_run_never_casts_and_records_its_base(tmp_path):
    """Training in fp32 (no bf16 hardware, --base-dtype auto) takes the path it took before the
    option existed: cast_frozen is never called; a bf16 run records its bf16 base."""
    from pelib.__main__ import main

    argv = ["finetune", "--method", "lora", "--r", "4", *TINY, "--eval-limit", "8", "--epochs", "1",
            "--no-progress", "--out", str(tmp_path)]
    with mock.patch.object(ft, "cpu_has_fast_bf16", lambda: False), \
            mock.patch("pelib.backbone.cast_frozen", side_effect=AssertionError("cast in fp32")):
        main([*argv, "--name", "fp32"])
    assert json.loads((tmp_path / "fp32.json").read_text())["base_dtype"] == "fp32"
    main([*argv, "--name", "bf16", "--bf16"])
    assert json.loads((tmp_path / "bf16.json").read_text())["base_dtype"] == "bf16"
