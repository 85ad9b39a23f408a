"""One QLoRA training step of a SmolLM2-shaped Llama with pelib's kernels on vs off (a row of
`python -m pelib bench kernels`; QLoRA, arXiv:2305.14314, with LoRA y = x W~^T + s x A^T B^T).

The model has SmolLM2-135M's shapes (30 layers, hidden 576, 9 query / 3 key-value heads of 64,
intermediate 1536, vocabulary 49152, tied embeddings) and random weights: the time of a step
does not depend on the values, and the GPU machine has no model packages. Every q, k, v, o,
gate, up and down projection is a pelib.quant.Linear4bit (NF4 + double quantisation, bf16
compute) under a LoRA of rank r (B random, so the LoRA path carries weight). One step:

    forward + causal-LM loss + backward + AdamW on the LoRA parameters

under bf16 autocast with fp32 LoRA weights, as HF's Trainer(bf16=True) runs a peft QLoRA model
(on the CPU path, in fp32 without autocast). "off" is the model as pelib builds it; "on" is the
same model after `pelib.patch.patch`. Two copies of one model, each with its own optimiser, so
both first steps start from the same weights and their losses are compared (rel_diff). The
patched copy stays patched only while its own steps run: RoPE's patch is process-wide.

FLOPs per step (N = batch * T tokens, P = weights of the 7 projections over all layers):
    frozen linears and tied lm_head   4 N (P + h V)          forward y, backward dx only
    causal attention                  6 N T h L              QK^T and PV, backward 2x forward
    LoRA                              N r (8 in + 6 out)     per projection (see lora.py)
Bytes: the 4-bit weights read twice (P bytes), the bf16 embedding read twice, and the logits
written and read three times (3 N V * 2). At SmolLM2 sizes the FLOPs set the limit (~3 ms on an
H200); a step of a model this narrow is far from it, bound by kernel launches and elementwise
traffic, which is what the kernels cut.
"""
import copy

import torch

from ..measure import peak_added_mb, time_ms

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2 = dict(L=30, h=576, Hq=9, Hk=3, m=1536, V=49152, r=16, batch=8, T=512)
TINY = dict(L=2, h=64, Hq=4, Hk=2, m=160, V=1003, r=4, batch=1, T=33)


def qlora_model(q, device, dtype):
    """A random Llama of shapes `q`, frozen base in `dtype`, 4-bit projections under fp32 LoRA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pelib.lora import apply_lora, lora_layers
    from pelib.quant import Linear4bit

    cfg = LlamaConfig(hidden_size=q["h"], intermediate_size=q["m"], num_hidden_layers=q["L"],
                      num_attention_heads=q["Hq"], num_key_value_heads=q["Hk"], vocab_size=q["V"],
                      max_position_embeddings=max(2048, q["T"]), tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)       # before quantising: .to() would cast the scales
    apply_lora(model, TARGETS, r=q["r"], alpha=2 * q["r"])
    gen = torch.Generator(device=device).manual_seed(1)
    for _, m in lora_layers(model):
        m.base_layer = Linear4bit.from_linear(m.base_layer, compute_dtype=dtype)   # NF4 + DQ
        m.lora_A.float()                                  # fp32 LoRA weights (and AdamW states)
        m.lora_B.float()
        with torch.no_grad():
            m.lora_B.weight.normal_(0, 0.02, generator=gen)
    return model


def _trainer(model, ids, dtype):
    """A closure running one training step; returns the loss (a 0-dim fp32 tensor)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = dict(device_type=ids.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.detach().float()
    return step


def qlora_step_row(q, device, dtype, peaks):
    """Time one QLoRA step with and without pelib.patch; a row for kernels.run's table.

    The two are timed one after the other, not in alternating turns: the RoPE patch is
    process-wide, so the unpatched model cannot step while the patched one is patched.
    """
    from ..patch import patch, unpatch

    N, h, m, V, r, L, T = q["batch"] * q["T"], q["h"], q["m"], q["V"], q["r"], q["L"], q["T"]
    kv = q["Hk"] * h // q["Hq"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (m, h), (m, h), (h, m)]        # (out, in) per layer
    P = L * sum(o * i for o, i in shapes)
    flops = 4 * N * (P + h * V) + 6 * N * T * h * L + L * sum(N * r * (8 * i + 6 * o) for o, i in shapes)
    nbytes = P + 2 * 2 * h * V + 3 * N * V * 2
    limit_ms = 1e3 * max(nbytes / peaks["bandwidth"], flops / peaks["bf16_flops"])

    off = qlora_model(q, device, dtype)
    on = copy.deepcopy(off)
    gen = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(0, V, (q["batch"], T), device=device, generator=gen)   # (batch, T)
    gpu = device.type == "cuda"
    row = {"case": "qlora_step", "bytes": nbytes, "flops": flops, "limit_ms": limit_ms}
    loss = {}
    for name, model in (("ours", on), ("torch", off)):
        step = _trainer(model, ids, dtype)
        if name == "ours":
            patch(on)           # only while its own steps run: the RoPE patch is process-wide
        try:
            loss[name], peak = peak_added_mb(step, device)       # first steps: the same weights
            timed = gpu or name == "torch"                       # CPU: Triton interprets, not timed
            ms = time_ms({name: step}, repeats=10, warmup=3, device=device)[name] if timed else None
            row[name + "_ms"] = ms
            row[name + "_GBps"] = None if ms is None else nbytes / (ms * 1e-3) / 1e9
            row[name + "_peak_MB"] = peak                        # of the first step (AdamW's states too)
        finally:
            unpatch(model)                                       # no-op for the unpatched copy
    row["rel_diff"] = (abs(loss["ours"] - loss["torch"]) / loss["torch"].abs()).item()
    row["speedup"] = None if row["ours_ms"] is None else row["torch_ms"] / row["ours_ms"]
    return row
