"""QLoRA: LoRA on a frozen 4-bit base (Dettmers et al. 2023, arXiv:2305.14314, eq. 5).

Each targeted nn.Linear becomes a Linear4bit (NF4 codes + double-quantised scales, 4.127
bits a weight at blocksize 64) wrapped in the same LoRALinear as plain LoRA:

    Y = X dequant(W_NF4)^T + b + s (dropout(X) A^T) B^T,     s = alpha / r

Only A, B (fp32, as peft trains them) and a classification head train. The gradient reaches
A and B through dL/dX of the base, which Dequant4bitLinear computes from the packed bytes
again; no (out, in) matrix is kept for backward. The adapter's state dict has LoRA's keys,
so `pelib.save_adapter` writes a peft LoRA adapter, loadable on the fp32 base too.

Merging. W~ = dequant(W_NF4) is not W, and W~ + s B A is not representable in NF4, so
"merge" has no exact 4-bit answer. `merge_qlora` offers the choices (notebook 06 measures
them on a trained model):
    "nf4"       requantise W~ + s B A to NF4 (+DQ): a 4-bit model again (what peft's merge
                does for bitsandbytes layers), but W~ sits on an NF4 level, so an update
                smaller than half a step rounds back to W~: a short fine-tune mostly vanishes;
    "fp32"      a dense fp32 nn.Linear holding W~ + s B A: equal to the adapter up to fp32
                rounding, at 32 bits a weight;
    "bf16"      the same weight rounded to bf16 (what a bf16 checkpoint stores), kept in an
                fp32 tensor so it runs in the fp32 model: storage error only, no bf16 math;
    "separate"  keep the 4-bit base and the adapter as they are (exact, costs the LoRA path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..inject import get_submodule_parent
from ..kernels.lora import DEQUANTIZERS
from ..lora import LoRAConfig, LoRALinear, apply_lora, lora_from_config, lora_layers
from .blockwise import QuantState, dequantize_4bit, dequantize_4bit_ref
from .linear4bit import Linear4bit

# The fused LoRA kernel (pelib.kernels.lora) reads a 4-bit W through these: (fast, reference).
DEQUANTIZERS[QuantState] = (dequantize_4bit, dequantize_4bit_ref)


@dataclass(frozen=True)
class QLoRAConfig(LoRAConfig):
    """QLoRA's recipe: LoRA's (r 8, alpha 2r, lr 2e-3) on an NF4 + double-quantised base; it
    writes LoRA's adapter file (loadable on the full-precision base too)."""

MERGE_STRATEGIES = ("nf4", "fp32", "bf16", "separate")


def apply_qlora(model: nn.Module, target_modules: str | Iterable[str], r: int = LoRAConfig.r,
                alpha: float | None = None, dropout: float = LoRAConfig.dropout, blocksize: int = 64,
                double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                modules_to_save: Iterable[str] | None = None, use_rslora: bool = False,
                quant_type: str = "nf4", rank_pattern: dict[str, int] | None = None,
                alpha_pattern: dict[str, float] | None = None) -> nn.Module:
    """Quantise every targeted nn.Linear to NF4 (+DQ), wrap it in LoRA, freeze the rest
    (a classification head, or `modules_to_save`, trains); alpha defaults to 2r. Modifies
    `model` and returns it."""
    quant = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant,
                 compute_dtype=compute_dtype)
    apply_lora(model, target_modules, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
               modules_to_save=modules_to_save, rank_pattern=rank_pattern,
               alpha_pattern=alpha_pattern, base_wrap=_quantiser(**quant))
    return _record(model, **quant)


def qlora_from_config(model: nn.Module, config: dict, modules_to_save=None, blocksize: int = 64,
                      double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                      quant_type: str = "nf4") -> nn.Module:
    """Inject the layers a peft LORA config describes (pelib.lora.lora_from_config) on a 4-bit
    base, quantised as apply_qlora does; for pelib.load_adapter(model, path, method="qlora")."""
    quant = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant,
                 compute_dtype=compute_dtype)
    lora_from_config(model, config, modules_to_save, base_wrap=_quantiser(**quant))
    return _record(model, **quant)


def _quantiser(blocksize, quant_type, double_quant, compute_dtype):
    """The base_wrap of apply_lora: each target becomes a frozen Linear4bit."""
    def quantise(linear: nn.Linear) -> Linear4bit:
        return Linear4bit.from_linear(linear, blocksize, quant_type, double_quant, compute_dtype)
    return quantise


def _record(model: nn.Module, blocksize, quant_type, double_quant, compute_dtype) -> nn.Module:
    model.pelib_quant = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                             compute_dtype=str(compute_dtype).removeprefix("torch."))
    return model


def qlora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in lora_layers(model) if isinstance(m.base_layer, Linear4bit)]


@torch.no_grad()
def merged_weight(layer: LoRALinear) -> torch.Tensor:
    """W~ + s B A in fp32, (out, in): the weight the adapted layer computes with."""
    return layer.base_layer.dequantized_weight(torch.float32) + layer.delta_weight().float()


def _dense(W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = torch.nn.utils.skip_init(nn.Linear, W.shape[1], W.shape[0], bias=bias is not None,
                                      device=W.device, dtype=W.dtype)
    linear.weight.data.copy_(W)
    if bias is not None:
        linear.bias.data.copy_(bias)
    return linear.requires_grad_(False)


@torch.no_grad()
def merge_qlora(model: nn.Module, strategy: str = "nf4") -> nn.Module:
    """Fold every QLoRA adapter into its base by `strategy` (module docstring); in place.

    After "nf4", "fp32" or "bf16" the model holds no adapter (save it before merging)."""
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"strategy must be one of {MERGE_STRATEGIES}, got {strategy!r}")
    layers = qlora_layers(model)
    if not layers:
        raise ValueError("this model has no QLoRA layers; build it with pelib.quant.apply_qlora")
    if strategy == "separate":
        return model
    for name, layer in layers:
        base = layer.base_layer
        W = merged_weight(layer)  # (out, in) fp32
        bias = None if base.bias is None else base.bias.detach().float()
        if strategy == "nf4":
            new = Linear4bit.from_linear(_dense(W, bias), base.blocksize, base.quant_type,
                                         base.double_quant, base.compute_dtype)
        else:
            if strategy == "bf16":  # round the stored values; compute stays fp32
                W = W.bfloat16().float()
                bias = None if bias is None else bias.bfloat16().float()
            new = _dense(W, bias)
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, new)
    for attr in ("pelib_adapter", "pelib_method"):  # no adapter is left: a plain model again
        if hasattr(model, attr):
            delattr(model, attr)
    model.pelib_merged = strategy
    return model


def qlora_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds, by kind: 4-bit weights (packed + scales), their code tables,
    other frozen tensors, trainable parameters, and AdamW's two fp32 moments per trainable
    parameter (what training adds before activations)."""
    out = dict(packed=0, scales=0, code_tables=0, frozen_dense=0, trainable=0)
    seen = set()
    for mod in model.modules():
        for name, t in mod.named_buffers(recurse=False):
            if id(t) in seen:
                continue
            seen.add(id(t))
            nbytes = t.numel() * t.element_size()
            if isinstance(mod, Linear4bit):
                key = {"packed": "packed", "code": "code_tables", "code2": "code_tables"}.get(name, "scales")
                out[key] += nbytes
            else:
                out["frozen_dense"] += nbytes
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out["trainable" if p.requires_grad else "frozen_dense"] += p.numel() * p.element_size()
    out["adam_states"] = 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out
