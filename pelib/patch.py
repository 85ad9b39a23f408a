"""Swap pelib's kernels into a transformers Llama model, explicitly, and back.

    model = pelib.patch.patch(model)       # RMSNorm, RoPE, SwiGLU, LoRA linears, loss -> kernels
    pelib.patch.unpatch(model)             # everything as it was

It lives outside pelib.kernels (which are leaves: torch and triton only) because it knows
transformers' Llama, pelib.lora and pelib.quant.

What is replaced (transformers 5.x, models.llama.modeling_llama):
    LlamaRMSNorm.forward    per instance -> rms_norm(x, weight, eps): weights and state-dict keys
                            are untouched (the module keeps its `weight` Parameter)
    LlamaMLP.forward        per instance -> down_proj(swiglu(gate_proj(x), up_proj(x))): the
                            three projections are still called as modules, only the
                            silu(g) * u between them is fused
    LoRALinear.forward      per instance, for the exact layer types the registry lists as fusable
                            (pelib.methods: LoRA's and QLoRA's LoRALinear; not SoRA's gated
                            subclass, whose gate the kernel lacks), when its base layer is an nn.Linear (dense
                            W) or a pelib.quant.Linear4bit (NF4/FP4 W) -> lora_linear(x, W, A, B,
                            scaling, bias): one autograd node per projection that saves x, A, B and
                            the 4-bit bytes, never a 16-bit W (see lora.py)
    apply_rotary_pos_emb    the module-level function LlamaAttention.forward calls by name ->
                            apply_rope. This one is process-wide (every Llama model in the
                            process sees it while at least one model is patched)
    model.loss_function     -> causal_lm_loss: HF's ForCausalLMLoss (shift, ignore -100,
                            num_items_in_batch) on the chunked cross-entropy kernel, without the
                            `logits.float()` copy

Each per-instance swap is a bound method stored in the module's __dict__, where it shadows the
class's forward; `unpatch` deletes it (or puts back an instance forward that was there before).
A LoRALinear whose dropout is active (p > 0, training), that is merged, or whose base W or bias
requires grad, runs the class's forward on that call (the checks are in `_lora_fusable`).
The attention itself (softmax(QK^T)V) is left to transformers.
"""
import types

import torch
import torch.nn.functional as F

from .kernels.cross_entropy_kernel import cross_entropy
from .kernels.lora import lora_linear
from .kernels.rmsnorm import rms_norm
from .kernels.rope import apply_rope
from .kernels.swiglu_kernel import swiglu

_rope_state = {"count": 0, "original": None}


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss with the kernel: tokens < n predict token n."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)                     # (B, T + 1)
        shift_labels = labels[..., 1:]                                          # (B, T)
    logits = logits.reshape(-1, vocab_size)                                     # (B*T, V) view, dtype kept
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return cross_entropy(logits, shift_labels, ignore_index, num_items=num_items_in_batch)


def _rmsnorm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _lora_weight(base):
    """The frozen W of a supported base layer: a dense tensor or a 4-bit (packed, QuantState)
    pair; None otherwise.

    Only a plain nn.Linear (not a subclass: bitsandbytes' Linear4bit is one, and its `weight`
    is not a dense W) and pelib's Linear4bit are fused; any other base keeps the class's forward.
    """
    from .quant import Linear4bit

    if type(base) is torch.nn.Linear:
        return base.weight                                                    # (out, in)
    if isinstance(base, Linear4bit):
        return (base.packed, base.quant_state)                               # 4-bit, never dense
    return None


def _lora_fusable(self) -> bool:
    """Checked on every call, because a layer can be merged or put in train mode after patch()."""
    drop = self.lora_dropout
    return not (
        self.merged                               # W already holds s*BA: the class skips LoRA
        # the fused backward has no dropout mask (it would have to save it, or the x it masks)
        or (isinstance(drop, torch.nn.Dropout) and drop.training and drop.p > 0)
        # the fused node gives no gradient to W or bias: if someone unfroze them, don't drop it
        or any(p.requires_grad for p in self.base_layer.parameters())
    )


def _lora_forward(self, x):
    """pelib.lora.LoRALinear on pelib.kernels.lora_linear: same value, fewer saved bytes.

    One compute dtype c for the whole node: the autocast dtype when autocast is on, else the
    base's (Linear4bit.compute_dtype, or W's dtype as nn.Linear requires). The result has the
    dtype LoRALinear.forward would give: base output (c under autocast or for nn.Linear, x's dtype
    for Linear4bit without autocast) promoted with the LoRA output (c under autocast, else
    lora_A's dtype). Forward hooks on lora_A, lora_B and base_layer are not called (their
    forwards are not).
    """
    base = self.base_layer
    W = _lora_weight(base)
    if W is None or not _lora_fusable(self):
        return type(self).forward(self, x)                                   # the class's own path
    A, B = self.lora_A.weight, self.lora_B.weight                            # (r, in), (out, r)
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:
        c = torch.get_autocast_dtype(x.device.type)
    else:
        c = base.compute_dtype if isinstance(W, tuple) else W.dtype
    base_dtype = x.dtype if isinstance(W, tuple) and not autocast else c  # Linear4bit: as nn.Linear
    out_dtype = torch.promote_types(base_dtype, c if autocast else A.dtype)
    y = lora_linear(x.to(c), W, A, B, self.scaling, base.bias)               # (..., out) in c
    return y.to(out_dtype)


def _llama():
    # imported here, not at the top: importing pelib.patch stays free of transformers
    import transformers.models.llama.modeling_llama as llama
    return llama


def patch(model):
    """Use pelib's kernels in a transformers Llama model (in place); returns the model.
    A causal LM's loss goes to the chunked cross-entropy kernel; a classifier keeps its loss.
    Adapter layers run on the fused LoRA kernel only where the registry lists their exact type
    (pelib.methods.fusable_layers): a subclass may compute something else (SoRA's gate, which
    the kernel does not have), so it keeps its own forward."""
    llama = _llama()
    from .methods import fusable_layers

    fusable = fusable_layers()
    if getattr(model, "_pelib_patched", False):
        return model
    swaps = []                                                                  # (module, new forward)
    for m in model.modules():
        if isinstance(m, llama.LlamaRMSNorm):
            swaps.append((m, _rmsnorm_forward))
        elif isinstance(m, llama.LlamaMLP):
            if m.config.hidden_act not in ("silu", "swish"):
                raise ValueError(f"SwiGLU kernel needs hidden_act='silu', got {m.config.hidden_act!r}")
            swaps.append((m, _mlp_forward))
        elif type(m) in fusable and _lora_weight(m.base_layer) is not None:
            swaps.append((m, _lora_forward))
    # (module, the instance forward it had before, usually None)
    model._pelib_swapped = [(m, m.__dict__.get("forward")) for m, _ in swaps]
    for m, fwd in swaps:
        m.forward = types.MethodType(fwd, m)
    if _rope_state["count"] == 0:
        _rope_state["original"] = llama.apply_rotary_pos_emb
        llama.apply_rotary_pos_emb = apply_rope
    _rope_state["count"] += 1
    model._pelib_old_loss = model.__dict__.get("_loss_function")
    if hasattr(model, "lm_head"):  # the kernel computes a next-token loss
        model.loss_function = causal_lm_loss
    model._pelib_patched = True
    return model


def unpatch(model):
    """Undo `patch`: instance forwards removed (or restored), RoPE and loss function restored."""
    llama = _llama()
    if not getattr(model, "_pelib_patched", False):
        return model
    for m, old in model._pelib_swapped:
        if old is None:
            del m.forward                                                       # back to the class's
        else:
            m.forward = old
    _rope_state["count"] -= 1
    if _rope_state["count"] == 0:
        llama.apply_rotary_pos_emb = _rope_state["original"]
    if model._pelib_old_loss is None:
        if "_loss_function" in model.__dict__:  # a classifier's loss was never swapped
            del model._loss_function
    else:
        model._loss_function = model._pelib_old_loss
    del model._pelib_old_loss, model._pelib_patched, model._pelib_swapped
    return model
