"""The method table: every way pelib fine-tunes a backbone, in one place.

    METHODS[name] = Method(lr, tag, build={impl: builder}, options, report, peft_type, ...)

`python -m pelib finetune`, `python -m pelib compare` and `pelib.load_adapter` read this table;
nothing else lists the methods. A builder takes the fresh backbone, the parsed options and a
`Run` (targets, run length) and returns the model to train and its training hooks
(pelib.train: AdaLoRA's allocator, SoRA's proximal step). Adding a method is its own module
(the layer and its training-time rule) plus one entry here.
"""
from __future__ import annotations

import argparse
import copy
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import io, peers
from .adalora import RankAllocator, apply_adalora
from .adapter import apply_adapters
from .inject import train_heads_only, trainable_parameters
from .lora import apply_lora, lora_from_config
from .prefix import apply_prefix
from .quant import apply_qlora, qlora_from_config
from .sora import (
    SoRA,
    SparsitySchedule,
    apply_sora,
    check_gate_shapes,
    export_lora,
    live_ranks,
    prune,
    sora_from_config,
    sora_layers,
)


@dataclass(frozen=True)
class Run:
    """What a builder needs besides the options: the target modules and the run's length."""

    targets: list[str]
    total_steps: int
    device: str = "cpu"  # where the model trains ("cuda" when one is there, see finetune)


@dataclass(frozen=True)
class Method:
    lr: float  # default AdamW lr of a 3-epoch run (compare's presets override it per budget)
    tag: Callable[[argparse.Namespace], str]  # the method's part of a run name, e.g. "lora-r8"
    build: dict[str, Callable]  # impl ("pelib", "peft") -> build(model, args, run) -> (model, hooks)
    options: Callable[[argparse._ArgumentGroup], None] | None = None  # its own CLI options
    report: Callable | None = None  # report(model, hooks, args, steps) -> dict for the run's record
    peft_type: str | None = None  # the adapter file it writes, if any
    from_config: Callable | None = None  # from_config(model, config, modules_to_save): inject
    check_file: Callable | None = None  # check_file(config, tensors, source) before loading
    help: str = ""


# The fresh classification head's lr in every method (--head-lr): chosen on the Banking77 dev
# split (docs/benchmarks.md). For --method head it is --lr.
HEAD_LR = 1e-2
# Label smoothing in every method (--label-smoothing). On Banking77 the dev split ties it with 0
# while the test split gains 0.004-0.006 for full fine-tuning and LoRA over three seeds; on
# CLINC150 dev and test both gain (docs/benchmarks.md, where the choice and its caveat are).
LABEL_SMOOTHING = 0.1


def _alpha(args, r: int) -> float:
    return args.alpha if args.alpha is not None else 2 * r


# -- builders ------------------------------------------------------------------------------
def _full(model, args, run):
    return model, []  # every parameter trains


def _head(model, args, run):
    """The floor every table carries: the backbone frozen, only the head trains. A frozen
    backbone is a fixed feature extractor, so its dropout is off (it would only blur the
    features the head learns from); the head's own dropout stays."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and name not in ("dropout", "classifier", "score"):
            m.p = 0.0
    return train_heads_only(model), []


def _lora(model, args, run):
    apply_lora(model, run.targets, r=args.r, alpha=_alpha(args, args.r), dropout=args.dropout,
               use_rslora=args.rslora)
    return model, []


def _lora_peft(model, args, run):
    return peers.lora(model, run.targets, args.r, _alpha(args, args.r), args.dropout,
                      args.rslora), []


def _qlora(model, args, run):  # NF4 + double quantisation base, fp32 LoRA (pelib.quant)
    apply_qlora(model, run.targets, r=args.r, alpha=_alpha(args, args.r), dropout=args.dropout,
                use_rslora=args.rslora)
    return model, []


def _qlora_peft(model, args, run):
    return peers.qlora(model, run.targets, args.r, _alpha(args, args.r), args.dropout,
                       args.rslora, device=run.device), []


def adalora_schedule(args, total: int) -> tuple[int, int]:
    """tinit, tfinal: 10% warm-up at full rank, 30% at the final pattern unless given."""
    tinit = args.tinit if args.tinit is not None else round(0.1 * total)
    tfinal = args.tfinal if args.tfinal is not None else round(0.3 * total)
    if args.target_r > args.init_r:
        raise ValueError(f"--target-r {args.target_r} exceeds --init-r {args.init_r}; AdaLoRA "
                         "only prunes: lower --target-r or raise --init-r")
    if tinit >= total - tfinal:
        raise ValueError(f"--tinit {tinit} + --tfinal {tfinal} leave no steps to prune in a run "
                         f"of {total} steps: lower them or train for more epochs")
    return tinit, tfinal


def _adalora(model, args, run):
    tinit, tfinal = adalora_schedule(args, run.total_steps)
    apply_adalora(model, run.targets, init_r=args.init_r, alpha=_alpha(args, args.init_r),
                  dropout=args.dropout)
    return model, [RankAllocator(model, target_r=args.target_r, tinit=tinit, tfinal=tfinal,
                                 deltaT=args.delta_t, orth_reg_weight=args.orth_reg_weight,
                                 total_step=run.total_steps)]


def _adalora_peft(model, args, run):
    tinit, tfinal = adalora_schedule(args, run.total_steps)
    model, hook = peers.adalora(model, run.targets, args.init_r, args.target_r,
                                _alpha(args, args.init_r), args.dropout, tinit, tfinal,
                                args.delta_t, args.orth_reg_weight, run.total_steps)
    return model, [hook]


# SoRA: threshold eta_t * xi with the gates' own lr, xi 0.05 -> 0.45 over 3 stages: the better of
# two settings on the Banking77 dev split (docs/benchmarks.md says how they were chosen).
SORA_DEFAULTS = {"sparse_lambda": 0.05, "sparse_lambda_max": 0.45, "sparse_stages": 3,
                 "gate_lr": 1e-2}


def _sora_arg(args, key):
    value = getattr(args, key)
    return SORA_DEFAULTS[key] if value is None else value


def _sora(model, args, run):
    apply_sora(model, run.targets, r=args.r, alpha=_alpha(args, args.r), dropout=args.dropout,
               gate_init=args.gate_init)
    start, end = _sora_arg(args, "sparse_lambda"), _sora_arg(args, "sparse_lambda_max")
    schedule = SparsitySchedule.linear(start, end,
                                       _sora_arg(args, "sparse_stages") if start != end else 1)
    schedule.begin(run.total_steps)  # a schedule must end within the run: say so before training
    return model, [SoRA(schedule, gate_lr=_sora_arg(args, "gate_lr"),
                        lr_scaled=args.threshold_scale == "lr", variant=args.prox_variant)]


def _adapter(model, args, run):
    return apply_adapters(model, kind=args.adapter_kind, bottleneck=args.bottleneck), []


def _prefix(model, args, run):
    return apply_prefix(model, prefix_length=args.prefix_length, hidden=args.prefix_hidden), []


def _prefix_peft(model, args, run):
    return peers.prefix(model, args.prefix_length, args.prefix_hidden), []


# -- options -------------------------------------------------------------------------------
def _adapter_options(g):
    g.add_argument("--adapter-kind", default="houlsby", choices=["houlsby", "pfeiffer"])
    g.add_argument("--bottleneck", type=int, default=64, help="adapter width m")


def _prefix_options(g):
    g.add_argument("--prefix-length", type=int, default=16, help="prefix tuning: L_p")
    g.add_argument("--prefix-hidden", type=int, default=None,
                   help="width of the prefix MLP (default: the model width)")


def _adalora_options(g):
    g.add_argument("--init-r", type=int, default=12, help="triplets per module at start")
    g.add_argument("--target-r", type=int, default=8, help="average triplets at the end")
    g.add_argument("--tinit", type=int, default=None,
                   help="steps before pruning starts (default: 10%% of the run)")
    g.add_argument("--tfinal", type=int, default=None,
                   help="steps at the final rank pattern (default: 30%% of the run)")
    g.add_argument("--delta-t", type=int, default=10, help="steps between two maskings")
    g.add_argument("--orth-reg-weight", type=float, default=0.5,
                   help="weight of the orthogonal regulariser (peft's default)")


def _sora_options(g):
    d = SORA_DEFAULTS
    g.add_argument("--sparse-lambda", type=float, default=None,
                   help="sparsity xi of the gates' L1 prox (first stage if a schedule); "
                        f"default {d['sparse_lambda']}")
    g.add_argument("--sparse-lambda-max", type=float, default=None,
                   help=f"xi of the last stage (default {d['sparse_lambda_max']}; = "
                        "--sparse-lambda: no schedule)")
    g.add_argument("--sparse-stages", type=int, default=None,
                   help="stages from --sparse-lambda to --sparse-lambda-max, splitting the run "
                        f"evenly (default {d['sparse_stages']})")
    g.add_argument("--gate-lr", type=float, default=None,
                   help=f"lr of the gates (default {d['gate_lr']})")
    g.add_argument("--threshold-scale", default="lr", choices=["lr", "none"],
                   help="prox threshold lr*xi (the paper) or xi (the official code)")
    g.add_argument("--prox-variant", default="exact", choices=["exact", "official"],
                   help="exact soft threshold, or the official code's update")
    g.add_argument("--gate-init", default="ones", choices=["ones", "normal"])
    g.add_argument("--save-adapter", default=None, metavar="DIR",
                   help="write the pruned adapter (peft LoRA format) to DIR")


# -- reports: what a method adds to the run's record ---------------------------------------
def _adalora_report(model, hooks, args, steps) -> dict:
    h = hooks[0]
    if not h.history:
        return {}
    tinit, tfinal = adalora_schedule(args, steps)
    return dict(budget=[e["budget"] for e in h.history], final_ranks=h.history[-1]["ranks"],
                schedule=dict(tinit=tinit, tfinal=tfinal, deltaT=args.delta_t, total_step=steps))


def _sora_report(model, hooks, args, steps) -> dict:
    """Live ranks per module and parameter counts before/after pruning (of a pruned copy)."""
    live = live_ranks(model)
    gates = torch.cat([m.gate.detach().abs() for _, m in sora_layers(model)])
    out = dict(live_ranks=live, live_ranks_total=sum(live.values()),
               live_gate_abs_mean=float(gates[gates > 0].mean()) if (gates > 0).any() else 0.0,
               initial_ranks_total=args.r * len(live),
               params_before_pruning=trainable_parameters(model),
               params_after_pruning=trainable_parameters(prune(copy.deepcopy(model))),
               live_ranks_history=getattr(hooks[0], "live_history", None))
    if args.save_adapter:
        export_lora(model, args.save_adapter)
        out["adapter"] = args.save_adapter
    print(f"SoRA: {out['live_ranks_total']} of {out['initial_ranks_total']} ranks live; "
          f"{out['params_after_pruning']:,} adapter parameters after pruning "
          f"({out['params_before_pruning']:,} before)")
    return out


def _r(args) -> str:
    return f"-r{args.r}"


# prefix: 1e-2 (common without the MLP) collapsed to chance through the MLP on Banking77;
# 3e-3 beat 1e-3 on the dev split.
METHODS: dict[str, Method] = {
    # the floor: 3e-2 beat 1e-2 on dev (one epoch, docs/benchmarks.md); compare gives it 3 epochs
    "head": Method(3e-2, lambda a: "", {"pelib": _head},
                   help="the floor: the backbone frozen, only the classification head trains"),
    "full": Method(1e-4, lambda a: "", {"pelib": _full}, help="every weight trains"),
    "lora": Method(2e-3, _r, {"pelib": _lora, "peft": _lora_peft}, peft_type="LORA",
                   from_config=lora_from_config, help="LoRA (Hu et al. 2021)"),
    "qlora": Method(2e-3, _r, {"pelib": _qlora, "peft": _qlora_peft}, peft_type="LORA",
                    from_config=qlora_from_config, help="LoRA on an NF4 + DQ base (Dettmers 2023)"),
    "adapter": Method(1e-3, lambda a: f"-{a.adapter_kind}-m{a.bottleneck}", {"pelib": _adapter},
                      options=_adapter_options, help="Houlsby / Pfeiffer bottleneck adapters"),
    "prefix": Method(3e-3, lambda a: f"-L{a.prefix_length}", {"pelib": _prefix, "peft": _prefix_peft},
                     options=_prefix_options, help="prefix tuning (Li & Liang 2021)"),
    "adalora": Method(2e-3, lambda a: f"-r{a.init_r}to{a.target_r}",
                      {"pelib": _adalora, "peft": _adalora_peft}, options=_adalora_options,
                      report=_adalora_report, peft_type="ADALORA",
                      help="AdaLoRA (Zhang et al. 2023)"),
    "sora": Method(2e-3, _r, {"pelib": _sora}, options=_sora_options, report=_sora_report,
                   peft_type="SORA", from_config=sora_from_config, check_file=check_gate_shapes,
                   help="SoRA (Ding et al. 2023)"),
}
# Which method reads an adapter file of each peft_type (QLoRA writes LORA files too).
FILE_READERS = {"LORA": "lora", "SORA": "sora"}


def load_adapter(model: nn.Module, path, method: str | None = None, **kwargs) -> nn.Module:
    """Load an adapter folder (peft's format) into `model`: a fresh base model, into which the
    file's method is injected, or a model already holding the same layers.

    The file's peft_type picks the method (LORA -> lora, SORA -> sora). `method="qlora"` loads
    a LORA file onto a 4-bit base (`kwargs`: blocksize, double_quant, compute_dtype,
    quant_type, as pelib.quant.apply_qlora)."""
    if method is None:
        peft_type = io.read_config(path).get("peft_type")
        if peft_type not in FILE_READERS:
            hint = (" An AdaLoRA file loads in peft (PeftModel.from_pretrained); to load it in "
                    "pelib, fold it into LoRA with pelib.adalora.to_lora before saving."
                    if peft_type == "ADALORA" else "")
            raise ValueError(f"{path}: pelib.load_adapter reads {sorted(FILE_READERS)} adapters, "
                             f"not peft_type {peft_type!r}.{hint}")
        method = FILE_READERS[peft_type]
    if method not in METHODS or METHODS[method].from_config is None:
        readers = sorted(k for k, m in METHODS.items() if m.from_config is not None)
        raise ValueError(f"method {method!r} has no adapter file to load; choose one of {readers}")
    m = METHODS[method]
    return io.load_with(model, path, (m.peft_type,), functools.partial(m.from_config, **kwargs),
                        m.check_file)


save_adapter = io.save_adapter
