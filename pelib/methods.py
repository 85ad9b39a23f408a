"""The registry: every way pelib fine-tunes a backbone, in one plain dict.

    METHODS[name] = Method(config, build={impl: builder}, report, save, from_config, check_file)

`config` is the method's recipe (pelib.recipe: its options with their tuned defaults, its lr,
its adapter file). `python -m pelib finetune` generates its method options from the configs,
`python -m pelib compare`'s presets name entries of this dict, `pelib.load_adapter` picks the
reader of a file here, and pelib.patch asks it which layers it may fuse; nothing else lists
the methods. A builder takes the fresh backbone, the method's config and a `Run` (targets, run
length) and returns the model to train and its training hooks (pelib.train); `save` writes the
trained adapter in peft's format (`finetune --save-adapter`). Adding a method is
its own module (config, layer, training rule) plus one entry here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import nn

from . import io, peers
from .adalora import AdaLoRAConfig, RankAllocator, apply_adalora
from .adapter import AdapterConfig, apply_adapters
from .dora import DoRAConfig, apply_dora, check_dora_file, dora_from_config
from .inject import train_heads_only
from .lora import LoRAConfig, LoRALinear, apply_lora, lora_from_config
from .prefix import PrefixConfig, apply_prefix
from .quant.qlora import QLoRAConfig, apply_qlora, qlora_from_config
from .recipe import Recipe
from .sora import (
    SoRAConfig,
    apply_sora,
    check_gate_shapes,
    sora_from_config,
)
from .sora import report as sora_report
from .sora import save as sora_save


@dataclass(frozen=True)
class Run:
    """What a builder needs besides the config: the target modules and the run's length."""

    targets: list[str]
    total_steps: int
    device: str = "cpu"  # where the model trains ("cuda" when one is there, see finetune)


@dataclass(frozen=True)
class Method:
    config: type[Recipe]  # the recipe: options and defaults, lr, adapter file
    build: dict[str, Callable]  # impl ("pelib", "peft") -> build(model, config, run) -> (model, hooks)
    report: Callable | None = None  # report(model, hooks, config, steps) -> dict for the run's record
    # save(model, folder) -> the folder, or None if nothing is left to write: its adapter file
    # (only a model pelib built, --impl pelib); None: the method has no file peft reads
    save: Callable | None = None
    from_config: Callable | None = None  # from_config(model, peft config, modules_to_save): inject
    check_file: Callable | None = None  # check_file(config, tensors, source) before loading
    fusable: tuple[type, ...] = ()  # its layer types pelib.patch may run on the fused LoRA kernel
    help: str = ""

    lr = property(lambda self: self.config.lr)
    peft_type = property(lambda self: self.config.peft_type)


@dataclass(frozen=True)
class HeadConfig(Recipe):
    """The floor every table carries: the backbone frozen, only the classification head trains,
    at the method's lr (3e-2, chosen on the dev split, docs/benchmarks.md)."""

    lr: ClassVar[float] = 3e-2
    head_lr: ClassVar[float | None] = None  # the head is what it trains: its lr is `lr`


@dataclass(frozen=True)
class ZeroShotConfig(Recipe):
    """The floor of the instruction-tuning table (--task sft only): the Instruct model as it is,
    nothing trained, asked with every label name in its prompt (pelib.sft.prompt_ids with the names). No
    options; it has no head, so it is a floor as the head-only row is (head_lr None)."""

    head_lr: ClassVar[float | None] = None


@dataclass(frozen=True)
class FullConfig(Recipe):
    """Every weight trains, at lr 1e-4 (chosen on the dev split, docs/benchmarks.md)."""

    lr: ClassVar[float] = 1e-4


# -- builders: build(model, config, run) -> (model, hooks) -----------------------------------
def _full(model, c: FullConfig, run):
    return model, []  # every parameter trains


def _head(model, c: HeadConfig, run):
    """A frozen backbone is a fixed feature extractor, so its dropout is off (it would only blur
    the features the head learns from); the head's own dropout stays."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and name not in ("dropout", "classifier", "score"):
            m.p = 0.0
    return train_heads_only(model), []


def _zero_shot(model, c: ZeroShotConfig, run):
    return model.requires_grad_(False), []  # nothing trains (pelib.sft_train.zero_shot)


def _lora(model, c: LoRAConfig, run):
    return apply_lora(model, run.targets, r=c.r, alpha=c.alpha, dropout=c.dropout,
                      use_rslora=c.rslora), []


def _lora_peft(model, c: LoRAConfig, run):
    return peers.lora(model, run.targets, c.r, c.alpha, c.dropout, c.rslora), []


def _dora(model, c: DoRAConfig, run):
    return apply_dora(model, run.targets, r=c.r, alpha=c.alpha, dropout=c.dropout,
                      use_rslora=c.rslora), []


def _dora_peft(model, c: DoRAConfig, run):
    return peers.lora(model, run.targets, c.r, c.alpha, c.dropout, c.rslora, use_dora=True), []


def _qlora(model, c: QLoRAConfig, run):  # NF4 + double quantisation base, fp32 LoRA (pelib.quant)
    return apply_qlora(model, run.targets, r=c.r, alpha=c.alpha, dropout=c.dropout,
                       use_rslora=c.rslora), []


def _qlora_peft(model, c: QLoRAConfig, run):
    return peers.qlora(model, run.targets, c.r, c.alpha, c.dropout, c.rslora,
                       device=run.device), []


def _adalora(model, c: AdaLoRAConfig, run):
    tinit, tfinal = c.schedule(run.total_steps)
    apply_adalora(model, run.targets, init_r=c.init_r, alpha=c.alpha, dropout=c.dropout)
    return model, [RankAllocator(model, target_r=c.target_r, tinit=tinit, tfinal=tfinal,
                                 deltaT=c.delta_t, orth_reg_weight=c.orth_reg_weight,
                                 total_step=run.total_steps)]


def _adalora_peft(model, c: AdaLoRAConfig, run):
    tinit, tfinal = c.schedule(run.total_steps)
    model, hook = peers.adalora(model, run.targets, c.init_r, c.target_r, c.alpha, c.dropout,
                                tinit, tfinal, c.delta_t, c.orth_reg_weight, run.total_steps)
    return model, [hook]


def _sora(model, c: SoRAConfig, run):
    apply_sora(model, run.targets, r=c.r, alpha=c.alpha, dropout=c.dropout, gate_init=c.gate_init)
    hook = c.hook()
    hook.schedule.begin(run.total_steps)  # a schedule must end within the run: say so now
    return model, [hook]


def _adapter(model, c: AdapterConfig, run):
    return apply_adapters(model, kind=c.adapter_kind, bottleneck=c.bottleneck), []


def _prefix(model, c: PrefixConfig, run):
    return apply_prefix(model, prefix_length=c.prefix_length, hidden=c.prefix_hidden), []


def _prefix_peft(model, c: PrefixConfig, run):
    return peers.prefix(model, c.prefix_length, c.prefix_hidden), []


# -- reports: what a method adds to the run's record ---------------------------------------
def _adalora_report(model, hooks, c: AdaLoRAConfig, steps) -> dict:
    h = hooks[0]
    if not h.history:
        return {}
    tinit, tfinal = c.schedule(steps)
    return dict(budget=[e["budget"] for e in h.history], final_ranks=h.history[-1]["ranks"],
                schedule=dict(tinit=tinit, tfinal=tfinal, deltaT=c.delta_t, total_step=steps))


METHODS: dict[str, Method] = {
    "head": Method(HeadConfig, {"pelib": _head},
                   help="the floor: the backbone frozen, only the classification head trains"),
    "zero-shot": Method(ZeroShotConfig, {"pelib": _zero_shot},
                        help="--task sft's floor: the Instruct model untrained, the label names "
                             "listed in its prompt"),
    "full": Method(FullConfig, {"pelib": _full}, help="every weight trains"),
    "lora": Method(LoRAConfig, {"pelib": _lora, "peft": _lora_peft}, save=io.save_adapter,
                   from_config=lora_from_config, fusable=(LoRALinear,), help="LoRA (Hu et al. 2021)"),
    "qlora": Method(QLoRAConfig, {"pelib": _qlora, "peft": _qlora_peft}, save=io.save_adapter,
                    from_config=qlora_from_config, fusable=(LoRALinear,),
                    help="LoRA on an NF4 + DQ base (Dettmers 2023)"),
    "adapter": Method(AdapterConfig, {"pelib": _adapter},
                      help="Houlsby / Pfeiffer bottleneck adapters"),
    "prefix": Method(PrefixConfig, {"pelib": _prefix, "peft": _prefix_peft},
                     help="prefix tuning (Li & Liang 2021)"),
    "adalora": Method(AdaLoRAConfig, {"pelib": _adalora, "peft": _adalora_peft},
                      report=_adalora_report, save=io.save_adapter,
                      help="AdaLoRA (Zhang et al. 2023)"),
    "sora": Method(SoRAConfig, {"pelib": _sora}, report=sora_report, save=sora_save,
                   from_config=sora_from_config, check_file=check_gate_shapes,
                   help="SoRA (Ding et al. 2023)"),
    "dora": Method(DoRAConfig, {"pelib": _dora, "peft": _dora_peft}, save=io.save_adapter,
                   from_config=dora_from_config,
                   check_file=check_dora_file, help="DoRA (Liu et al. 2024)"),
}


def file_readers() -> dict[str, str]:
    """Which method reads a plain adapter file of each peft_type (one that sets none of the
    registry's FLAGS): the first entry that writes it and has a loader (QLoRA writes LORA
    files too; lora reads them)."""
    readers: dict[str, str] = {}
    for name, m in METHODS.items():
        if m.from_config is not None and not m.config.FLAGS:
            readers.setdefault(m.peft_type, name)
    return readers


def reader_of(config: dict) -> str | None:
    """The method that reads a file of this adapter_config.json: the first entry with its
    peft_type and a loader whose FLAGS are exactly the flags the file sets (a LORA file with
    `use_dora: true` -> dora, without -> lora); None if no entry does."""
    sets = file_flags(config)
    return next((name for name, m in METHODS.items() if m.from_config is not None
                 and m.peft_type == config.get("peft_type") and set(m.config.FLAGS) == sets), None)


def file_flags(config: dict) -> set[str]:
    """The registry's FLAGS that a file's config sets (true)."""
    return {f for m in METHODS.values() for f in m.config.FLAGS if config.get(f)}


def fusable_layers() -> tuple[type, ...]:
    """The exact layer types pelib.patch may run on the fused LoRA kernel (no subclasses)."""
    return tuple(dict.fromkeys(t for m in METHODS.values() for t in m.fusable))


def load_adapter(model: nn.Module, path, method: str | None = None, **kwargs) -> nn.Module:
    """Load an adapter folder (peft's format) into `model`: a fresh base model, into which the
    file's method is injected, or a model already holding the same layers.

    The file's peft_type and flags pick the method (reader_of: LORA -> lora, LORA with
    `use_dora: true` -> dora, SORA -> sora); a `method` given must read the file's flags (lora
    refuses a DoRA file). `method="qlora"` loads a LORA file onto a 4-bit base (`kwargs`:
    blocksize, double_quant, compute_dtype, quant_type, as pelib.quant.apply_qlora)."""
    config = io.read_config(path)
    reader = reader_of(config)
    if method is None:
        if reader is None:
            peft_type = config.get("peft_type")
            hint = (" An AdaLoRA file loads in peft (PeftModel.from_pretrained); to load it in "
                    "pelib, fold it into LoRA with pelib.adalora.to_lora before saving."
                    if peft_type == "ADALORA" else "")
            raise ValueError(f"{path}: pelib.load_adapter reads {sorted(file_readers())} "
                             f"adapters, not peft_type {peft_type!r}.{hint}")
        method = reader
    if method not in METHODS or METHODS[method].from_config is None:
        readers = sorted(k for k, m in METHODS.items() if m.from_config is not None)
        raise ValueError(f"method {method!r} has no adapter file to load; choose one of {readers}")
    m = METHODS[method]
    sets = file_flags(config)
    if sets != set(m.config.FLAGS) and config.get("peft_type") == m.peft_type:
        marks = ", ".join(f"{f}: true" for f in sorted(sets)) or \
            "no " + ", ".join(m.config.FLAGS)
        what = f"a {METHODS[reader].help} adapter" if reader else "an adapter no method reads"
        raise ValueError(f"{path} holds {what} ({marks}), not a {method} one; load it with "
                         f"pelib.load_adapter(model, path), which picks the method from the file")
    # a model that holds its layers already must match the file in the method's fields and in
    # every flag (a plain LoRA file into a DoRA model would leave its magnitudes unset)
    flags = tuple(f for x in METHODS.values() for f in x.config.FLAGS)
    return io.load_with(model, path, (m.peft_type,), functools.partial(m.from_config, **kwargs),
                        m.check_file, match=tuple(dict.fromkeys(m.config.MATCH + flags)))


save_adapter = io.save_adapter
