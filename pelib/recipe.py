"""A method's recipe: one small frozen dataclass per method, the defaults its tables used.

    LoRAConfig()              r=8, alpha=2r, dropout 0, lr 2e-3, head lr 1e-2, label smoothing 0.1
    LoRAConfig(r=2).alpha     4.0 (alpha follows r unless given)
    LoRAConfig.from_peft(d)   the config an adapter_config.json describes; .to_peft() back

A config holds three things, and everything else reads them from here:
* the method's own options, as dataclass fields (`python -m pelib finetune` turns each field
  into a command-line option, so an option a method lacks is refused rather than ignored);
* the training recipe as class attributes: `lr`, `head_lr`, `label_smoothing` (what
  pelib.train.TrainConfig.of(config) takes; the command line's --lr etc. override them);
* its adapter file: `peft_type`, `to_peft()` / `from_peft()` for peft's adapter_config.json,
  `FLAGS`, the switches that mark a variant of that peft_type (DoRA is LORA + use_dora), and
  `MATCH`, the file fields that must equal the model's when a file is loaded into a model
  that already holds the layers (else the weights would run at another scale).

The registry of these configs (pelib.methods.METHODS, a plain dict) is the one list of methods.
This module is a leaf: the method modules import their base class from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The fresh classification head's lr in every method, chosen on the Banking77 dev split
# (docs/benchmarks.md). Only the head trains in --method head: there its lr is the method's.
HEAD_LR = 1e-2
# Label smoothing in every method: the dev split ties it with 0 while the test splits gain
# (docs/benchmarks.md, where the choice and its caveat are).
LABEL_SMOOTHING = 0.1


@dataclass(frozen=True)
class Task:
    """What a fine-tune learns (`pelib finetune --task`) and the loop's defaults for it; the
    method's recipe (lr, alpha = 2r, 6% warm-up then linear decay) is the same for both."""

    epochs: float
    batch_size: int
    max_length: int  # tokens of a row: the text (classify), or chat prompt + answer + eos (sft)
    head: bool  # a fresh classification head (head_lr, label smoothing, pooling, probe init)


TASKS = {
    # a fresh head on the pooled states, cross-entropy over the classes
    "classify": Task(epochs=3, batch_size=32, max_length=64, head=True),
    # instruction tuning (pelib.sft): the Instruct model's chat template, the answer is the
    # intent's name (underscores as spaces) + eos, the loss on the answer's tokens only, one
    # epoch at batch 16; 160 tokens hold the longest Banking77 conversation (144)
    "sft": Task(epochs=1, batch_size=16, max_length=160, head=False),
}


def option(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (), **argparse):
    """A config field that is also a command-line option: `flags` (default --field-name) and
    argparse's own keywords (type, choices, nargs); a bool field is a switch."""
    return field(default=default, metadata=dict(help=help, flags=flags, argparse=argparse))


@dataclass(frozen=True)
class Recipe:
    """The base of every method's config: the shared recipe, and the file conversions."""

    lr: ClassVar[float] = 2e-3  # AdamW's lr for the method's own parameters
    head_lr: ClassVar[float | None] = HEAD_LR  # the fresh classification head's own lr
    label_smoothing: ClassVar[float] = LABEL_SMOOTHING
    peft_type: ClassVar[str | None] = None  # the adapter file it writes, if any
    MATCH: ClassVar[tuple[str, ...]] = ()  # file fields a model holding the layers must match
    # the true/false fields of peft's file that mark this method's variant of its peft_type
    # (DoRA's `use_dora` in a LORA file): pelib.load_adapter gives a file to the entry whose
    # FLAGS are exactly the ones the file sets
    FLAGS: ClassVar[tuple[str, ...]] = ()

    def tag(self) -> str:
        """The method's part of a run name after the method, e.g. "-r8" (lora-r8)."""
        return ""

    def to_peft(self) -> dict:
        """The method's fields of peft's adapter_config.json (targets and heads are added by
        the model that holds the layers: pelib.inject.adapter_record)."""
        raise ValueError(f"{type(self).__name__} has no adapter file")

    @classmethod
    def from_peft(cls, config: dict) -> "Recipe":
        raise ValueError(f"{cls.__name__} has no adapter file")

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The fields the command line offers (flag, type, help in each field's metadata)."""
        return [f for f in dataclasses.fields(cls) if "help" in f.metadata]

    @classmethod
    def from_options(cls, opts: dict) -> "Recipe":
        """The config of parsed options: the fields given (not None), the recipe for the rest."""
        return cls(**{f.name: opts[f.name] for f in cls.options()
                      if opts.get(f.name) is not None})


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)


def peft_fields(config: dict, keys: tuple[str, ...]) -> dict:
    """The `MATCH` fields of a file's (or a model's) config, normalised: missing patterns are
    {}, a missing switch (peft's use_rslora, use_dora) is False, a target list is a sorted set."""
    out = {k: config.get(k) for k in keys}
    for k in ("rank_pattern", "alpha_pattern"):
        if k in out:
            out[k] = out[k] or {}
    for k in out:
        if k.startswith("use_"):
            out[k] = bool(out[k])
    if isinstance(out.get("target_modules"), list):
        out["target_modules"] = sorted(set(out["target_modules"]))
    return out
