"""Swap pelib's kernels into a transformers Llama model, explicitly, and back.

    model = pelib.kernels.patch(model)     # RMSNorm, RoPE, SwiGLU and the loss use the kernels
    pelib.kernels.unpatch(model)           # everything as it was

What is replaced (transformers 5.x, models.llama.modeling_llama):
    LlamaRMSNorm.forward    per instance -> rms_norm(x, weight, eps): weights and state-dict keys
                            are untouched (the module keeps its `weight` Parameter)
    LlamaMLP.forward        per instance -> down_proj(swiglu(gate_proj(x), up_proj(x))): the
                            three nn.Linear (or LoRA-wrapped) projections are still called as
                            modules, only the silu(g) * u between them is fused
    apply_rotary_pos_emb    the module-level function LlamaAttention.forward calls by name ->
                            apply_rope. This one is process-wide (every Llama model in the
                            process sees it while at least one model is patched)
    model.loss_function     -> causal_lm_loss: HF's ForCausalLMLoss (shift, ignore -100,
                            num_items_in_batch) on the chunked cross-entropy kernel, without the
                            `logits.float()` copy

Not replaced: the nn.Linear projections. Fusing LoRA into them (pelib.kernels.lora_linear, with
W dense or NF4) needs pelib.lora's layer class, written elsewhere; `LORA_HOOK` below is where it
plugs in. The attention itself (softmax(QK^T)V) is left to transformers.
"""
import torch.nn.functional as F

from .cross_entropy import cross_entropy
from .rmsnorm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

_rope_state = {"count": 0, "original": None}

# TODO(issue 7, next slice): when pelib.lora lands, map its LoRA linear class to a forward that
# calls pelib.kernels.lora_linear(x, W or NF4Weight, lora_A, lora_B, scaling, bias). patch()
# applies `LORA_HOOK(module)` to every module for which it returns a forward; None = untouched.
LORA_HOOK = None


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss with the kernel: tokens < n predict token n."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)                     # (B, T + 1)
        shift_labels = labels[..., 1:]                                          # (B, T)
    logits = logits.reshape(-1, vocab_size)                                     # (B*T, V) view, dtype kept
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return cross_entropy(logits, shift_labels, ignore_index, num_items=num_items_in_batch)


def _rmsnorm_forward(module):
    def forward(hidden_states):
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)
    return forward


def _mlp_forward(module):
    def forward(x):
        return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))
    return forward


def _llama():
    # imported here, not at the top: `import pelib.kernels` stays free of transformers
    import transformers.models.llama.modeling_llama as llama
    return llama


def patch(model):
    """Use pelib's kernels in a transformers Llama model (in place); returns the model."""
    llama = _llama()
    if getattr(model, "_pelib_patched", False):
        return model
    swaps = []                                                                  # (module, new forward)
    for m in model.modules():
        if isinstance(m, llama.LlamaRMSNorm):
            swaps.append((m, _rmsnorm_forward(m)))
        elif isinstance(m, llama.LlamaMLP):
            if m.config.hidden_act not in ("silu", "swish"):
                raise ValueError(f"SwiGLU kernel needs hidden_act='silu', got {m.config.hidden_act!r}")
            swaps.append((m, _mlp_forward(m)))
        elif LORA_HOOK is not None and (fwd := LORA_HOOK(m)) is not None:
            swaps.append((m, fwd))
    for m, fwd in swaps:
        m.forward = fwd
    model._pelib_swapped = [m for m, _ in swaps]
    if _rope_state["count"] == 0:
        _rope_state["original"] = llama.apply_rotary_pos_emb
        llama.apply_rotary_pos_emb = apply_rope
    _rope_state["count"] += 1
    model._pelib_old_loss = model.__dict__.get("_loss_function")
    model.loss_function = causal_lm_loss
    model._pelib_patched = True
    return model


def unpatch(model):
    """Undo `patch`: instance forwards removed, RoPE and loss function restored."""
    llama = _llama()
    if not getattr(model, "_pelib_patched", False):
        return model
    for m in model._pelib_swapped:
        del m.forward                                                           # back to the class's
    _rope_state["count"] -= 1
    if _rope_state["count"] == 0:
        llama.apply_rotary_pos_emb = _rope_state["original"]
    if model._pelib_old_loss is None:
        del model._loss_function
    else:
        model._loss_function = model._pelib_old_loss
    del model._pelib_old_loss, model._pelib_patched, model._pelib_swapped
    return model
