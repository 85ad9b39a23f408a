"""Checkers for notebook 11 (instruction tuning): left padding for generation, a label-smoothed
chunked linear cross-entropy that keeps no N x V tensor for the backward, the log-likelihood
of every answer (a classifier from the LM) in at most two forward calls, and packing."""
import math
import random

import torch
import torch.nn.functional as F

import pelib
from checks._guard import forbidden
from pelib import sft


def exercise_1(left_pad):
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    with forbidden((sft, "collate_prompts")):
        got = left_pad(prompts, 0)
    T = 5
    ids = [[0] * (T - len(p)) + p for p in prompts]
    mask = [[0] * (T - len(p)) + [1] * len(p) for p in prompts]
    assert set(got) >= {"input_ids", "attention_mask"}, f"keys {sorted(got)}"
    for key, want in [("input_ids", ids), ("attention_mask", mask)]:
        t = got[key]
        assert isinstance(t, torch.Tensor) and t.dtype == torch.long, f"{key}: a torch.long tensor"
        assert t.tolist() == want, f"{key}: {t.tolist()}, expected {want} (pads on the left)"
    print(f"left_pad: {len(prompts)} prompts of 1-5 tokens, every row ends at column {T - 1}")


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def exercise_2(smoothed_linear_ce):
    g = torch.Generator().manual_seed(11)
    N, H, V, eps, chunk = 40, 16, 300, 0.1, 8
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100                                                # unlabelled rows
    with forbidden((F, "cross_entropy")):
        loss, kept = _saved_bytes(lambda: smoothed_linear_ce(h, W, y, eps, chunk))
        grads = torch.autograd.grad(loss, (h, W))
    ref = F.cross_entropy(h @ W.T, y, ignore_index=-100, label_smoothing=eps)
    ref_grads = torch.autograd.grad(ref, (h, W))
    assert torch.allclose(loss.double(), ref, rtol=1e-6, atol=1e-8), \
        f"loss {loss.item():.8f}, expected {ref.item():.8f}"
    for name, a, b in zip("hW", grads, ref_grads):
        err = (a.double() - b).abs().max().item()
        assert err < 1e-6, f"d loss / d {name} is off by up to {err:.2e}: check d loss / dz"
    logits_bytes = N * V * 8                                     # the fp64 logits of all rows
    assert kept < logits_bytes, (
        f"the loss saved {kept:,} bytes for its backward, the full {N} x {V} logits are "
        f"{logits_bytes:,}: keep only what the chunks need (dh, dW, or h and W to recompute)")
    print(f"smoothed_linear_ce: loss and gradients == F.cross_entropy(label_smoothing={eps}); "
          f"{kept:,} bytes saved for backward (all logits: {logits_bytes:,})")


def exercise_3(answer_logprobs):
    model = pelib.tiny_backbone("smollm2", task="causal_lm", with_tokenizer=False, seed=11,
                                vocab_size=97, pad_token_id=0)[0].double().eval()
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(1, 97, (7,), generator=g).tolist()
    answers = [torch.randint(1, 97, (k,), generator=g).tolist() for k in (3, 1, 4, 2, 3)]
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with torch.no_grad():
            got = answer_logprobs(model, prompt, answers)
    finally:
        hook.remove()
    want = []
    with torch.no_grad():
        for a in answers:                                        # one forward per answer
            logp = model(input_ids=torch.tensor([prompt + a])).logits[0].log_softmax(-1)
            want.append(sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(a)))
    want = torch.stack(want)
    assert isinstance(got, torch.Tensor) and got.shape == (len(answers),), \
        f"expected a tensor of shape ({len(answers)},), got {getattr(got, 'shape', type(got))}"
    assert torch.allclose(got.double(), want, atol=1e-6), \
        f"log-likelihoods {got.tolist()}, expected {want.tolist()}"
    assert calls[0] <= 2, f"{calls[0]} forward calls: at most 2 (pad the answers into one batch)"
    print(f"answer_logprobs: {len(answers)} answers of 1-4 tokens scored in {calls[0]} forward "
          f"call(s), equal to one forward per answer")


def exercise_4(pack):
    rng = random.Random(11)
    examples = []
    for _ in range(60):                                          # prompts of 20-80, answers of 2-8
        p, a = rng.randint(20, 80), rng.randint(2, 8)
        ids = [rng.randint(3, 999) for _ in range(p + a)]
        examples.append((ids, [-100] * p + ids[p:]))
    capacity = 256
    packs = pack(examples, capacity)
    seen = []
    for k in packs:
        ids, labels, pos = ([int(v) for v in k[key]] for key in ("input_ids", "labels", "position_ids"))
        assert len(ids) == len(labels) == len(pos), "input_ids, labels, position_ids: one length"
        assert len(ids) <= capacity, f"a pack of {len(ids)} tokens exceeds capacity {capacity}"
        starts = [i for i, q in enumerate(pos) if q == 0]
        assert starts[:1] == [0], "a pack's position_ids start at 0"
        for s, e in zip(starts, starts[1:] + [len(ids)]):
            assert pos[s:e] == list(range(e - s)), "position_ids count 0, 1, 2, ... in each row"
            seen.append((tuple(ids[s:e]), tuple(labels[s:e])))
    want = sorted((tuple(x), tuple(y)) for x, y in examples)
    assert sorted(seen) == want, (f"the packs hold {len(seen)} conversations rebuilt from the "
                                  f"position resets, not the {len(examples)} given, each once")
    lower = math.ceil(sum(len(x) for x, _ in examples) / capacity)
    assert len(packs) <= 11 / 9 * lower + 1, \
        f"{len(packs)} packs; first-fit decreasing needs at most {11 / 9 * lower + 1:.1f} here"
    print(f"pack: {len(examples)} conversations in {len(packs)} packs of <= {capacity} tokens "
          f"(at least {lower} needed), positions reset per conversation")
