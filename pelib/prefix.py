"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190).

Every attention layer l gets L_p learned key and value vectors that every token can attend to,
as if a prefix of L_p virtual tokens preceded the input. With the layer's own
K = X W_K, V = X W_V of shape (T, d_kv) and the prefix P_K^l, P_V^l of shape (L_p, d_kv):

    head_l(Q, K, V) = softmax(Q [P_K^l; K]^T / sqrt(d_h) + M) [P_V^l; V]      keys: L_p + T

M is the usual mask (padding, causality) over the T real keys; the prefix columns are never
masked. Only the prefix trains, n_layers * 2 * L_p * d_kv numbers. With grouped-query
attention (SmolLM2: 9 query heads, 3 KV heads) the prefix lives in KV-head space, so
d_kv = n_kv_heads * head_dim and it is shared by the query heads of a group like K and V are.

Reparametrisation. Li & Liang found that optimising P directly is unstable and instead train

    P[i, :] = MLP(P'[i, :]),   P': (L_p, d),   MLP: Linear(d, h), tanh, Linear(h, n_layers*2*d_kv)

After training only P is needed: `fold()` evaluates the MLP once and keeps the plain tensor of
shape (n_layers, 2, n_kv_heads, L_p, head_dim); the outputs are bitwise the same before and after.

How the prefix gets in. peft puts the prefix into the KV cache (`past_key_values`), which ties
it to transformers' cache classes (it broke when they changed) and, because the cache length
shifts positions, moves the real tokens to positions L_p, L_p+1, ... We hook one step later:
transformers looks up its attention function by name (`config._attn_implementation`) in a
public registry, `AttentionInterface`. We register "pelib_prefix_eager" / "pelib_prefix_sdpa",
which concatenate the prefix to the keys and values the model has just formed (after RoPE and
after any cache update, so a generation cache only ever holds real tokens) and widen the mask
by L_p always-visible columns, then call the original eager or SDPA function. Token positions
stay 0, 1, ... as without a prefix; the prefix keys carry no position (no rotation in Llama).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .inject import inject
from .recipe import Recipe, option


@dataclass(frozen=True)
class PrefixConfig(Recipe):
    """Prefix tuning's recipe: L_p = 16 through the MLP, lr 3e-3 (chosen on the Banking77 dev
    split, docs/searches.md)."""

    lr: ClassVar[float] = 3e-3
    prefix_length: int = option(16, "prefix tuning: L_p", type=int)
    prefix_hidden: int | None = option(None, "width of the prefix MLP (default: the model "
                                             "width)", type=int)

    def tag(self) -> str:
        return f"-L{self.prefix_length}"

# Full-name pattern of the self-attention module of each layer, per model_type.
ATTENTION = {"bert": r".*\.layer\.\d+\.attention\.self", "llama": r".*\.layers\.\d+\.self_attn"}
BASE_ATTENTION = ("eager", "sdpa")
NAME = "pelib_prefix_{}"


class PrefixEncoder(nn.Module):
    """The prefix of every layer: P = MLP(P') while training, a plain tensor once folded."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, prefix_length: int,
                 d_model: int, hidden: int | None = None, projection: bool = True):
        super().__init__()
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.prefix_length = prefix_length
        self.kv_dim = n_kv_heads * head_dim
        if projection:
            hidden = hidden or d_model
            self.embedding = nn.Parameter(torch.randn(prefix_length, d_model))  # P': (L_p, d)
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(),
                                     nn.Linear(hidden, n_layers * 2 * self.kv_dim))
            self.prefix = None
        else:
            self.prefix = nn.Parameter(  # (n_layers, 2, n_kv_heads, L_p, head_dim)
                torch.randn(n_layers, 2, n_kv_heads, prefix_length, head_dim))

    @property
    def folded(self) -> bool:
        return self.prefix is not None

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_K, P_V) of one layer, each (n_kv_heads, L_p, head_dim)."""
        if self.folded:
            return self.prefix[layer, 0], self.prefix[layer, 1]
        h = self.mlp[1](self.mlp[0](self.embedding))              # (L_p, hidden)
        # Only this layer's rows of the last Linear: the output is laid out
        # (L_p, n_layers, 2, n_kv_heads, head_dim), the same order as peft's.
        rows = slice(layer * 2 * self.kv_dim, (layer + 1) * 2 * self.kv_dim)
        out = self.mlp[2]
        kv = F.linear(h, out.weight[rows], out.bias[rows])         # (L_p, 2 * d_kv)
        kv = kv.view(self.prefix_length, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]                                        # 2 x (n_kv, L_p, hd)

    @torch.no_grad()
    def fold(self) -> "PrefixEncoder":
        """Evaluate the MLP once and keep only P; drops the MLP's parameters."""
        if not self.folded:
            P = torch.stack([torch.stack(self.layer_kv(i)) for i in range(self.n_layers)])
            del self.embedding, self.mlp
            self.prefix = nn.Parameter(P)  # (n_layers, 2, n_kv_heads, L_p, head_dim)
        return self

    def extra_repr(self) -> str:
        return (f"n_layers={self.n_layers}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, prefix_length={self.prefix_length}, "
                f"folded={self.folded}")


@dataclass(eq=False)
class PrefixSlot:
    """Attached to each attention module (a plain attribute, not a submodule)."""
    encoder: PrefixEncoder
    layer: int


def extend_mask(mask: torch.Tensor | None, prefix_length: int, query: torch.Tensor,
                n_keys: int, causal: bool) -> torch.Tensor | None:
    """A mask over the T real keys -> a mask over [prefix; keys]; every query sees the prefix.

    mask: None, or (B or 1, 1 or H, T_q, T) as bool (True = attend, SDPA) or additive float
    (0 = attend, eager)."""
    T_q = query.shape[2]
    if mask is None:
        if not causal or T_q == 1:
            return None  # nothing masked among the real keys, and the prefix needs no mask
        # No mask meant "use SDPA's is_causal", which aligns the triangle top-left: wrong once
        # the keys outnumber the queries. Spell the causal mask out (keys = past + queries).
        past = n_keys - T_q
        keys = torch.arange(n_keys, device=query.device)
        allowed = keys[None, :] <= torch.arange(T_q, device=query.device)[:, None] + past
        mask = torch.zeros(T_q, n_keys, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]  # (1,1,T_q,T)
    shape = (*mask.shape[:-1], prefix_length)
    visible = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat([visible, mask], dim=-1)  # (B, 1, T_q, L_p + T)


def base_attention(module: nn.Module, base: str):
    """The attention function the model would have used: its own eager one, or SDPA."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__}'s module has no eager_attention_forward; "
                        "prefix tuning here supports Llama and BERT attention")
    return fn


def make_prefix_attention(base: str):
    def prefix_attention(module, query, key, value, attention_mask, **kwargs):
        # query: (B, H, T_q, hd); key, value: (B, H_kv, T, hd), T = past + T_q
        slot = getattr(module, "pelib_prefix", None)
        if slot is not None:
            P_K, P_V = slot.encoder.layer_kv(slot.layer)            # (H_kv, L_p, hd)
            B = key.shape[0]
            attention_mask = extend_mask(attention_mask, slot.encoder.prefix_length, query,
                                         key.shape[2], getattr(module, "is_causal", False))
            key = torch.cat([P_K.to(key.dtype).expand(B, -1, -1, -1), key], dim=2)
            value = torch.cat([P_V.to(value.dtype).expand(B, -1, -1, -1), value], dim=2)
        return base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    prefix_attention.__name__ = NAME.format(base)
    return prefix_attention


def register(base: str) -> str:
    """Register the prefix variant of `base` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = NAME.format(base)
    AttentionInterface.register(name, make_prefix_attention(base))
    # The masks the model builds stay those of the base implementation (bool for SDPA, additive
    # float for eager); prefix_attention widens them.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def kv_geometry(config) -> tuple[int, int, int, int]:
    """(n_layers, n_kv_heads, head_dim, d_model) from a transformers config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return config.num_hidden_layers, n_kv, head_dim, config.hidden_size


def apply_prefix(model: nn.Module, prefix_length: int = PrefixConfig.prefix_length,
                 hidden: int | None = PrefixConfig.prefix_hidden,
                 projection: bool = True,
                 modules_to_save: Iterable[str] | None = None) -> nn.Module:
    """Give every self-attention layer a learned prefix of `prefix_length` keys and values;
    freeze everything else (a classification head, or `modules_to_save`, stays trainable).
    The prefix lives in `model.prefix_encoder`. It is switched on through
    `config._attn_implementation` ("pelib_prefix_eager" / "pelib_prefix_sdpa"): setting another
    attention implementation afterwards switches it off."""
    if not isinstance(prefix_length, int) or isinstance(prefix_length, bool) or prefix_length <= 0:
        raise ValueError(f"prefix_length must be a positive integer, got {prefix_length!r}")
    if hidden is not None and (not isinstance(hidden, int) or hidden <= 0):
        raise ValueError(f"hidden must be a positive integer (or None for d_model), got {hidden!r}")
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    if mtype not in ATTENTION:
        raise ValueError(f"apply_prefix knows the attention of model types {sorted(ATTENTION)} "
                         f"(MiniLM is 'bert', SmolLM2 is 'llama'), not "
                         f"{mtype or type(model).__name__!r}")
    if hasattr(model, "prefix_encoder"):
        raise ValueError("this model already has a prefix; load a fresh backbone first")
    base = config._attn_implementation or "eager"
    if base not in BASE_ATTENTION:
        raise ValueError(f"prefix tuning here runs on attn_implementation {list(BASE_ATTENTION)}, "
                         f"not {base!r}; call model.set_attn_implementation('sdpa') first")
    n_layers, n_kv, head_dim, d = kv_geometry(config)
    p = next(model.parameters())
    encoder = PrefixEncoder(n_layers, n_kv, head_dim, prefix_length, d, hidden,
                            projection).to(p.device, p.dtype)
    slots = []

    def wrap(name: str, attn: nn.Module) -> nn.Module:
        base_attention(attn, base)  # fails early for an attention we do not know
        slots.append((attn, PrefixSlot(encoder, len(slots))))
        return attn  # the module stays; it only gets a slot

    inject(model, ATTENTION[mtype], wrap, modules_to_save, what="a prefix")
    if len(slots) != n_layers:
        raise ValueError(f"found {len(slots)} attention modules but the config says "
                         f"{n_layers} layers")
    for attn, slot in slots:
        attn.pelib_prefix = slot
    model.prefix_encoder = encoder  # registered after inject froze the model: it trains
    name = register(base)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise TypeError(f"{type(model).__name__} refused attn_implementation {name!r}; prefix "
                        "tuning needs a model that dispatches through AttentionInterface")
    return model


def fold(model: nn.Module) -> nn.Module:
    """Replace the reparametrisation MLP by the prefix tensor it computes."""
    encoder = getattr(model, "prefix_encoder", None)
    if encoder is None:
        raise ValueError("this model has no prefix; call apply_prefix first")
    encoder.fold()
    return model


def prefix_parameters(n_layers: int, n_kv_heads: int, head_dim: int, prefix_length: int,
                      d_model: int, hidden: int | None = None, projection: bool = True) -> int:
    """Trainable numbers of a PrefixEncoder (closed form)."""
    out = n_layers * 2 * n_kv_heads * head_dim
    if not projection:
        return out * prefix_length
    h = hidden or d_model
    return prefix_length * d_model + (d_model * h + h) + (h * out + out)
