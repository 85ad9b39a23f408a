"""Adapter files in peft's format: `adapter_config.json` + `adapter_model.safetensors`.

peft stores each trainable tensor under `base_model.model.<name in the base model>`, e.g.
`base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`, and a trained
classification head as `base_model.model.classifier.weight`. pelib's module names are the base
model's names plus peft's `lora_A` / `lora_B`, so the mapping is just that prefix. Files are
written to a temporary name and renamed, so a crash never leaves half an adapter behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to path (atomic on one file system)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of an injected model (adapter weights and trained heads)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _task_type(model: nn.Module) -> str:
    if hasattr(model, "lm_head"):
        return "CAUSAL_LM"
    if hasattr(model, "classifier") or hasattr(model, "score"):
        return "SEQ_CLS"
    return "FEATURE_EXTRACTION"


def save_adapter(model: nn.Module, path: str | os.PathLike,
                 base_model_name_or_path: str | None = None) -> Path:
    config = getattr(model, "pelib_adapter", None)
    if config is None:
        raise ValueError("this model has no pelib adapter; call pelib.apply_lora (or another "
                         "method) before save_adapter")
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError("the adapter is merged into the base weights; call "
                         "pelib.lora.unmerge(model) before saving it")
    if config.get("peft_type") == "ADALORA":  # masked triplets dropped, as peft saves them
        from .adalora import pruned_state_dict

        if not config.get("total_step"):
            raise ValueError("an AdaLoRA adapter needs its schedule to be saved: create a "
                             "pelib.adalora.RankAllocator for the model and train with it first")
        state = pruned_state_dict(model)
    else:
        state = adapter_state_dict(model)
    tensors = {PREFIX + n: t.contiguous() for n, t in state.items()}
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite (NaN/inf) weights: {bad[:3]}")
    full = dict(config, task_type=_task_type(model), bias="none", fan_in_fan_out=False,
                init_lora_weights=True, inference_mode=True, alpha_pattern={},
                base_model_name_or_path=base_model_name_or_path or getattr(model, "pelib_name", None),
                modules_to_save=config.get("modules_to_save") or None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME,
                 lambda tmp: Path(tmp).write_text(json.dumps(full, indent=2, sort_keys=True)))
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name} not found: an adapter folder holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    config = json.loads((path / CONFIG_NAME).read_text())
    tensors = load_file(path / WEIGHTS_NAME)
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Inject the adapter described by `path` into a fresh base model and load its weights."""
    from .lora import apply_lora

    config, tensors = read_adapter(path)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported by "
                         "pelib.load_adapter (LORA is)")
    if getattr(model, "pelib_adapter", None) is None:
        apply_lora(model, config["target_modules"], r=config["r"], alpha=config["lora_alpha"],
                   dropout=config.get("lora_dropout", 0.0),
                   use_rslora=config.get("use_rslora", False),
                   modules_to_save=_existing(model, config.get("modules_to_save")),
                   rank_pattern=config.get("rank_pattern") or None)
    load_adapter_weights(model, tensors, source=str(path))
    return model


def _existing(model: nn.Module, names):
    # peft lists both "classifier" and "score" for SEQ_CLS; keep the ones this model has.
    if not names:
        return None
    have = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [n for n in names if n in have] or None


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source="") -> None:
    own = dict(model.named_parameters())
    expected = adapter_state_dict(model).keys()
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
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"adapter {source} holds NaN/inf weights in {bad[:3]}")
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
