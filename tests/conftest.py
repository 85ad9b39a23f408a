"""Test-wide settings and the helpers several test files share (`from conftest import tiny`).

pytest puts tests/ on sys.path (rootdir conftest), so a test imports these from `conftest`; no
test file imports another. Helpers import pelib lazily: the environment below must be set first.

Tiers: a file whose tests start a subprocess, run a Triton kernel in the interpreter or train more
than a few steps declares `pytestmark = pytest.mark.integration`; real weights and full-size runs
are `pytest.mark.slow`. Every other test is a unit test, and the guard below holds it to that.
"""
import multiprocessing.process
import os
import subprocess

import pytest
import torch

# The tests own their process, as the command line does: Triton kernels (pelib's and the tests'
# own) run in the interpreter on a CPU, and the Hugging Face libraries stay offline. Importing
# pelib sets none of these; the variables are read at import time, so they are set first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PELIB_FAST", "1")


# ---- the unit tier's guard ---------------------------------------------------------------------

TIER_MARKS = ("integration", "slow")


def _refuse(what):
    def refused(*args, **kwargs):
        raise RuntimeError(f"a unit test may not {what}: mark the file "
                           "`pytestmark = pytest.mark.integration`")
    return refused


@pytest.fixture(autouse=True)
def unit_tier_guard(request, monkeypatch):
    """A test with neither tier mark (a unit test) may not start a process or run a Triton kernel
    in the interpreter: those are what make a tier slow, so they fail here instead of creeping in."""
    if any(request.node.get_closest_marker(m) for m in TIER_MARKS):
        yield
        return
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a subprocess"))
    monkeypatch.setattr(os, "fork", _refuse("fork a process"))
    monkeypatch.setattr(os, "system", _refuse("start a subprocess"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("start a process"))
    try:  # every interpreted launch, kernel[grid](...), goes through the GridExecutor
        from triton.runtime.interpreter import GridExecutor
    except ImportError:  # no Triton: nothing to launch
        pass
    else:
        monkeypatch.setattr(GridExecutor, "__call__",
                            _refuse("run a Triton kernel in the interpreter"))
    yield


# ---- tiny models and batches -------------------------------------------------------------------

def tiny(name="minilm", task="classification", num_labels=5, seed=0, sizes=None, **overrides):
    """A toy-size `name` (random weights, seeded, no tokenizer), as pelib.tiny_backbone builds it.

    `overrides` change the config; `sizes` ({name: overrides}) lets a file pin its own shapes
    for every backbone at once (test_qlora: multiples of bitsandbytes' blocksize)."""
    import pelib

    overrides = {**(sizes or {}).get(name, {}), **overrides}
    return pelib.tiny_backbone(name, num_labels, task=task, seed=seed, with_tokenizer=False,
                               **overrides)[0]


def batch(vocab=30522, B=3, T=11, seed=0):
    """Random ids in [5, vocab) and a mask with one right-padded row (row 1 from position 7)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # one padded row
    return dict(input_ids=ids, attention_mask=mask)


def randomise_B(model, seed=1):
    """LoRA's B is zero at step 0; a random B makes the adapter change the outputs."""
    from pelib.lora import lora_layers

    g = torch.Generator().manual_seed(seed)
    for _, m in lora_layers(model):
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1


def tiny_llama():
    """A 2-layer random Llama (GQA, odd vocabulary) in eager attention, for the kernel patch tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1003, max_position_embeddings=64)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    return model


def loss_and_grads(model, ids, labels=None):
    """A causal LM's loss on `ids` (labels: ids) and the gradient of every trainable parameter."""
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids if labels is None else labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


def grad_fns(loss):
    """The names of every autograd node behind `loss` (which kernels the backward runs through)."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        stack.extend(g for g, _ in f.next_functions)
    return names


# ---- peft's parameter names --------------------------------------------------------------------

HEADS = ("classifier.", "score.")  # MiniLM's and SmolLM2's classification heads


def peft_key(name):
    """pelib's parameter name -> peft's: the adapter name `default` after each LoRA/AdaLoRA tensor,
    the trained head under `modules_to_save.default`, all under `base_model.model.`."""
    for k in ("lora_A", "lora_B", "lora_E"):
        name = name.replace(f".{k}", f".{k}.default")
    for head in HEADS:
        if name.startswith(head):
            name = head + "modules_to_save.default." + name.removeprefix(head)
    return "base_model.model." + name


def pelib_key(peft_name):
    """peft's parameter name -> pelib's (the inverse of peft_key)."""
    return peft_name.replace(".default", "").replace("modules_to_save.", "").removeprefix("base_model.model.")


def copy_into_peft(ours, theirs):
    """Copy every trainable tensor of pelib's model (adapter + head) into peft's model."""
    params = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            params[peft_key(n)].data.copy_(p.data)


# ---- kernel tolerances -------------------------------------------------------------------------

# (atol, rtol) for forward outputs; gradients get their own, looser, entries in each test.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(out, ref, atol, rtol, what=""):
    """Pass when |out - ref| <= atol + rtol * |ref| elementwise (same shape and dtype)."""
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert out.dtype == ref.dtype, (what, out.dtype, ref.dtype)
    o, r = out.double(), ref.double()
    err = (o - r).abs()
    bound = atol + rtol * r.abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{err.numel()} elements off; max |err| {err.max().item():.3g}, "
        f"max err/bound {(err / bound).max().item():.3g} (atol {atol}, rtol {rtol})"
    )



def stop_at(at: int):
    """A training hook that interrupts the run (like Ctrl-C) right after optimizer step `at`:
    the resume tests stop a run this way."""
    from pelib.hooks import Hook

    class StopAt(Hook):
        def step(self, model, step):
            if step == at:
                raise KeyboardInterrupt

    return StopAt()
