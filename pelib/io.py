"""Adapter files in peft's format: `adapter_config.json` + `adapter_model.safetensors`.

peft stores each trainable tensor under `base_model.model.<name in the base model>`, e.g.
`base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`, and a trained
classification head as `base_model.model.classifier.weight`. pelib's module names are the base
model's names plus peft's `lora_A` / `lora_B`, so the mapping is just that prefix. Files are
written to a temporary name and renamed, so a crash never leaves half an adapter behind.

This module knows no method. A method declares its file through what it put on the model:
`model.pelib_adapter`, the config record (pelib.inject.adapter_record), and, where a layer
stores other tensors than its parameters (AdaLoRA drops its pruned triplets), the layer's
`export_tensors(name)`. Loading is `load_with(model, path, peft_types, from_config)`: the
method passes its own `from_config` (inject the layers a config describes); `pelib.load_adapter`
(pelib.methods) picks it from the file's peft_type.

A file is read as peft reads it or refused by name: a peft feature pelib's layers do not
implement (UNSUPPORTED: bias, lora_bias, layers_to_transform...), a field of the wrong kind, or
a tensor that is neither an adapter weight nor in modules_to_save (it would overwrite the base
model) ends in one line naming the field or tensor.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_write
from .recipe import peft_fields

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: every trainable tensor (adapter weights and trained
    heads), except that a layer defining `export_tensors(name)` gives its own."""
    exporters = [(n, m) for n, m in model.named_modules() if hasattr(m, "export_tensors")]
    owned = tuple(f"{n}." for n, _ in exporters)
    out = {n: p.detach() for n, p in model.named_parameters()
           if p.requires_grad and not n.startswith(owned)}
    for n, m in exporters:
        out.update(m.export_tensors(n))
    return out


def _task_type(model: nn.Module) -> str:
    if hasattr(model, "lm_head"):
        return "CAUSAL_LM"
    if hasattr(model, "classifier") or hasattr(model, "score"):
        return "SEQ_CLS"
    return "FEATURE_EXTRACTION"


def save_adapter(model: nn.Module, path: str | os.PathLike,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter of an injected model as a peft adapter folder; returns the folder."""
    config = getattr(model, "pelib_adapter", None)
    if config is None and getattr(model, "pelib_method", None) is not None:
        raise ValueError(
            f"this model has {model.pelib_method}: peft has no adapter file for that method "
            "(save_adapter writes LoRA-family adapters); save the trained tensors with safetensors: "
            "save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if "
            "p.requires_grad}, 'weights.safetensors'), and load them into a model built the same "
            "way with model.load_state_dict(load_file('weights.safetensors'), strict=False)")
    if config is None:
        raise ValueError("this model has no pelib adapter; call pelib.apply_lora (or another "
                         "method) before save_adapter")
    if config.get("save_blocked"):  # a method that cannot be saved yet says why
        raise ValueError(config["save_blocked"])
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError("the adapter is merged into the base weights; call "
                         "pelib.lora.unmerge(model) before saving it")
    tensors = {PREFIX + n: t.contiguous() for n, t in adapter_state_dict(model).items()}
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite (NaN/inf) weights: {bad[:3]}")
    full = dict({k: v for k, v in config.items() if k != "save_blocked"},
                task_type=_task_type(model), bias="none", fan_in_fan_out=False,
                init_lora_weights=True, inference_mode=True,
                alpha_pattern=config.get("alpha_pattern") or {},
                base_model_name_or_path=base_model_name_or_path or getattr(model, "pelib_name", None),
                modules_to_save=config.get("modules_to_save") or None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME,
                 lambda tmp: Path(tmp).write_text(json.dumps(full, indent=2, sort_keys=True)))
    return path


def _require(path: Path, name: str) -> Path:
    if not (path / name).exists():
        raise FileNotFoundError(f"{path / name} not found: an adapter folder holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    return path / name


def read_config(path: str | os.PathLike) -> dict:
    """The adapter_config.json of an adapter folder, as a dict; clear errors if broken."""
    path = Path(path)
    config_file, _ = _require(path, CONFIG_NAME), _require(path, WEIGHTS_NAME)
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON ({e}); save the adapter again") \
            from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_NAME} holds no JSON object; save the adapter again")
    return config


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors without peft's prefix) of an adapter folder; clear errors if broken."""
    path = Path(path)
    config = read_config(path)
    try:
        tensors = load_file(path / WEIGHTS_NAME)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / WEIGHTS_NAME} is not a readable safetensors file ({e}); "
                         "save the adapter again") from None
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def existing_modules(model: nn.Module, names) -> list[str] | None:
    """The modules_to_save of a config that this model has (peft lists both "classifier" and
    "score" for SEQ_CLS); None if none."""
    if not names:
        return None
    have = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [n for n in names if n in have] or None


# peft features pelib's layers do not implement: field -> (its off value, what it does). A file
# that turns one on is refused by name; loading it would give other outputs than peft's.
UNSUPPORTED = {
    "bias": ("none", "trains the biases of the base layers too"),
    "lora_bias": (False, "gives lora_B a bias"),
    "layers_to_transform": (None, "adapts only some layers"),
    "layers_pattern": (None, "adapts only some layers"),
    "exclude_modules": (None, "leaves some matching modules out"),
    "fan_in_fan_out": (False, "stores weights transposed (GPT-2's Conv1D)"),
    "layer_replication": (None, "stacks copies of base layers"),
    "target_parameters": (None, "adapts nn.Parameters instead of modules"),
    "trainable_token_indices": (None, "trains some embedding rows"),
}


def _number(v, integer=False) -> bool:
    kinds = int if integer else (int, float)
    return isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v)


def check_fields(config: dict, source) -> None:
    """Refuse a config whose fields pelib would read wrong, naming the field: a feature pelib does
    not implement (UNSUPPORTED), or a rank, alpha, target list or pattern of the wrong kind."""
    for k, (off, does) in UNSUPPORTED.items():
        v = config.get(k, off)
        if v not in (off, None, [], {}) and not (k == "bias" and v == "none"):
            raise ValueError(f"{source}: {k} = {v!r} ({does}) is a peft feature pelib does not "
                             f"support; load this adapter with peft (PeftModel.from_pretrained), "
                             f"or train one with {k} = {off!r}")
    if config.get("peft_type") in ("LORA", "SORA"):
        for k, integer in (("r", True), ("lora_alpha", False)):
            if k not in config or not _number(config[k], integer):
                kind = "a positive integer" if integer else "a finite number"
                raise ValueError(f"{source}: {k} = {config.get(k, '(missing)')!r} is not {kind}; "
                                 "write the value the adapter was trained with")
    t = config.get("target_modules", "(missing)")
    if not (isinstance(t, str) and t != "(missing)" or isinstance(t, list) and t
            and all(isinstance(x, str) for x in t)):
        raise ValueError(f"{source}: target_modules = {t!r} names no modules; write the list of "
                         "module names the adapter wraps, e.g. [\"query\", \"value\"]")
    for k, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        p = config.get(k)
        if p is not None and not (isinstance(p, dict) and all(
                isinstance(key, str) and _number(v, integer) for key, v in p.items())):
            raise ValueError(f"{source}: {k} = {p!r} must map module-name patterns to "
                             f"{'ranks' if integer else 'alphas'}, e.g. {{\"query\": 8}}, or be {{}}")


def file_heads(model: nn.Module, config: dict) -> list[str] | None:
    """The heads a file trained, as peft reads them: its modules_to_save, or, with none listed,
    the classification head for a SEQ_CLS file (peft's default) and nothing for another task
    (peft then keeps the base model's head)."""
    listed = config.get("modules_to_save")
    if listed:
        return existing_modules(model, listed)
    return None if config.get("task_type") == "SEQ_CLS" else []


def check_same_adapter(model: nn.Module, config: dict, source: str,
                       match: tuple[str, ...] = ("peft_type",)) -> None:
    """Loading into a model that has its layers already: the file must describe those layers
    (the method config's MATCH fields: type, rank, alpha, targets, patterns), else its weights
    would run at another scale."""
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError(f"cannot load {source} into a merged model (its base weights already "
                         "hold an update); load into a fresh base model instead")
    have, want = peft_fields(model.pelib_adapter, match), peft_fields(config, match)
    diff = {k: (have[k], want[k]) for k in match if have[k] != want[k]}
    if diff:
        raise ValueError(f"{source} was trained with other settings than this model's adapter "
                         f"(model vs file: {diff}); load it into a fresh base model instead")


def load_with(model: nn.Module, path: str | os.PathLike, peft_types: tuple[str, ...],
              from_config: Callable[[nn.Module, dict, list | None], object],
              check: Callable[[dict, dict, str], None] | None = None,
              match: tuple[str, ...] = ("peft_type",)) -> nn.Module:
    """The one loader: read the folder, inject the layers the config describes with
    `from_config(model, config, modules_to_save)` (or check that the model's own layers match
    it in the `match` fields), then copy the weights in. `check(config, tensors, source)` may
    refuse a file first."""
    config, tensors = read_adapter(path)
    path = Path(path)
    if config.get("peft_type") not in peft_types:
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not one of "
                         f"{list(peft_types)}; pelib.load_adapter(model, path) picks the loader "
                         "from the file")
    check_fields(config, path / CONFIG_NAME)
    if check is not None:
        check(config, tensors, str(path))
    if getattr(model, "pelib_adapter", None) is None:
        from_config(model, config, file_heads(model, config))
    else:
        check_same_adapter(model, config, str(path), match)
    load_adapter_weights(model, tensors, source=str(path))
    return model


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source="") -> None:
    own = dict(model.named_parameters())
    expected = adapter_state_dict(model).keys()
    base = sorted(k for k in tensors if k in own and k not in expected)
    if base:  # peft would copy them over the base model's weights
        raise ValueError(f"adapter {source} holds {len(base)} tensor(s) that are neither adapter "
                         f"weights nor in its modules_to_save, e.g. {base[:3]}; pelib does not "
                         "overwrite the base model from an adapter file: remove them, or list "
                         "their module in modules_to_save")
    unknown = sorted(k for k in tensors if k not in own)
    missing = sorted(k for k in expected if k not in tensors)
    wrong = [f"{k}: file {tuple(t.shape)} vs model {tuple(own[k].shape)}"
             for k, t in tensors.items() if k in own and t.shape != own[k].shape]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} key(s) the model does not have, e.g. {unknown[:3]}")
    if missing:
        problems.append(f"{len(missing)} adapter key(s) missing from the file, e.g. {missing[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong[:5]))
    if problems:
        raise ValueError(f"adapter {source} does not fit this model (was it trained for another "
                         "base model?): " + " | ".join(problems))
    not_float = [k for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise ValueError(f"adapter {source} holds non-float tensors in {not_float[:3]} "
                         f"({tensors[not_float[0]].dtype}); adapter weights are floating point")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"adapter {source} holds NaN/inf weights in {bad[:3]}")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
