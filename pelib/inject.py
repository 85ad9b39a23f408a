r"""Injection: find target modules by name, swap each for a wrapper, freeze everything else.

Every PEFT method in pelib goes through here, so they all agree on what a target name means:
a module matches `t` when its full name equals `t` or ends with `.t` (peft's rule for a list),
and a single string that is not a module name is read as a regular expression that must match
the full name (peft's rule for a string). A `rank_pattern` / `alpha_pattern` key is a regular
expression too: the first key for which `(.*\.)?(key)$` matches the module's name from its start
gives the value (peft 0.21's `get_pattern_key`).

Patterns come from files, so they are matched with a time limit (the `regex` package's
timeout): a pattern that backtracks without end is refused instead of hanging the process.

The checks every method shares live here too: one method per model (`inject` refuses a
second), a dropout in [0, 1), and the config record (`adapter_record`, what pelib.io writes
as adapter_config.json in peft's format).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import regex
from torch import nn

# Heads that a sequence-classification model creates from scratch; they must train.
CLASSIFIER_HEADS = ("classifier", "score")


# Seconds that matching one pattern against every module name of a model may take.
PATTERN_SECONDS = 2.0


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _regex_matches(pattern: str, names: list[str], what: str, match=regex.fullmatch,
                   shown: str | None = None) -> list[bool]:
    """[match(pattern, name) for name in names], all of them within PATTERN_SECONDS; errors
    name the pattern as the user wrote it (`shown`)."""
    shown = pattern if shown is None else shown
    deadline = time.monotonic() + PATTERN_SECONDS
    try:
        return [match(pattern, n, timeout=max(deadline - time.monotonic(), 1e-3)) is not None
                for n in names]
    except TimeoutError:
        raise ValueError(f"{what} {shown!r} takes more than {PATTERN_SECONDS:g} s to match the module "
                         "names (a pattern that backtracks without end); simplify the regular "
                         "expression, or list the module names") from None
    except regex.error as e:
        raise ValueError(f"{what} {shown!r} is not a valid regular expression ({e}); fix it, or "
                         "list the module names, e.g. ['query']") from None


def pattern_value(pattern: dict, name: str, default, what: str = "rank_pattern / alpha_pattern key"):
    r"""peft's rank_pattern / alpha_pattern rule: the value of the first key for which
    `(.*\.)?(key)$` matches the module `name` from its start (peft's get_pattern_key), else
    `default`. A key is a regular expression: "query|value" selects both, "layer\.0\..*query"
    the first layer's query."""
    for key, value in pattern.items():
        if _regex_matches(rf"(.*\.)?({key})$", [name], what, match=regex.match, shown=key)[0]:
            return value
    return default


def find_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Full names of the modules that `target_modules` selects, in model order."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target_modules, str):
        hits = _regex_matches(target_modules, names, "target")
        found = [n for n, hit in zip(names, hits) if hit]
        if not found and any(_matches(n, target_modules) for n in names):
            raise ValueError(f"a single string is a regular expression that must match the full "
                             f"module name (peft's rule), and {target_modules!r} matches none; "
                             f"for the name-suffix rule pass a list: [{target_modules!r}]")
        wanted = [target_modules]
    else:
        wanted = list(target_modules)
        if not wanted:
            raise ValueError("target_modules is empty; name at least one module, e.g. ['query']")
        found = [n for n in names if any(_matches(n, t) for t in wanted)]
        missing = [t for t in wanted if not any(_matches(n, t) for n in names)]
        if missing:
            raise ValueError(
                f"target module(s) {missing} match no module of {type(model).__name__}. "
                f"Its nn.Linear modules end in: {linear_suffixes(model)}")
    if not found:
        raise ValueError(f"target {wanted} matches no module of {type(model).__name__}. "
                         f"Its nn.Linear modules end in: {linear_suffixes(model)}")
    return found


def linear_suffixes(model: nn.Module) -> list[str]:
    """The last name part of every nn.Linear: what users usually pass as targets."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear)})


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def inject(model: nn.Module, target_modules, wrap: Callable[[str, nn.Module], nn.Module],
           modules_to_save: Iterable[str] | None = None, what: str = "an adapter") -> nn.Module:
    """Freeze `model`, then replace each target by `wrap(name, module)` (whose new parameters
    stay trainable) and unfreeze `modules_to_save` (default: a classification head).
    `what` names the method's layers in errors ("LoRA layers", "a prefix")."""
    have = getattr(model, "pelib_method", None)
    if have is not None:  # a second method would freeze the first one's parameters
        raise ValueError(f"this model already has {have}; load a fresh backbone first "
                         "(pelib injects one method per model)")
    targets = find_targets(model, target_modules) if target_modules != [] else []
    wrapped = [(name, wrap(name, model.get_submodule(name))) for name in targets]  # all checks first
    for p in model.parameters():
        p.requires_grad_(False)
    for name, new in wrapped:
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, new)
    for name in resolve_modules_to_save(model, modules_to_save):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.pelib_method = what
    return model


def train_heads_only(model: nn.Module, modules_to_save: Iterable[str] | None = None) -> nn.Module:
    """The floor under every method: freeze the whole backbone, train only the classification
    head (or `modules_to_save`). A fine-tune that does not beat this has a bug to explain."""
    return inject(model, [], lambda name, m: m, modules_to_save, what="a head-only setup")


def check_lora_args(target_modules, r, alpha, dropout) -> None:
    """The arguments every LoRA-family apply_* takes, refused before anything is built: targets
    (a regular expression, or a non-empty list of name suffixes), a positive integer rank, an
    alpha that is a number (None: the method's default) and a dropout that is a number."""
    if isinstance(target_modules, str):
        pass
    elif not isinstance(target_modules, (list, tuple, set)) or not target_modules:
        raise ValueError(f"target_modules must name the modules to adapt, as a list of name "
                         f"suffixes (e.g. ['query', 'value']) or a regular expression string, "
                         f"got {target_modules!r}")
    elif not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules entries must be module names (strings), got "
                         f"{list(target_modules)!r}")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    for k, v in dict(alpha=alpha, dropout=dropout).items():
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ValueError(f"{k} must be a number, got {v!r} ({type(v).__name__}); write it "
                             f"without quotes, e.g. {k}={2 * r if k == 'alpha' else 0.1}")


def check_dropout(dropout: float) -> None:
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:  # also refuses NaN
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def check_alpha(alpha: float) -> None:
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")


def adapter_record(model: nn.Module, peft_type: str, target_modules,
                   modules_to_save: Iterable[str] | None, **fields) -> dict:
    """Set and return `model.pelib_adapter`: the fields of peft's adapter_config.json for this
    method (peft_type, targets, the trained heads, and the method's own `fields`)."""
    model.pelib_adapter = dict(
        peft_type=peft_type,
        target_modules=target_modules if isinstance(target_modules, str) else
        sorted(set(target_modules)),
        modules_to_save=resolve_modules_to_save(model, modules_to_save), **fields)
    return model.pelib_adapter


def resolve_modules_to_save(model: nn.Module, modules_to_save: Iterable[str] | None) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    if modules_to_save is None:  # the freshly initialised head of a classifier
        return [h for h in CLASSIFIER_HEADS if h in names]
    out = []
    for t in modules_to_save:
        hits = [n for n in names if _matches(n, t)]
        if not hits:
            raise ValueError(f"modules_to_save entry {t!r} matches no module")
        out += hits
    return out


def inject_linears(model: nn.Module, target_modules,
                   make: Callable[[str, nn.Linear], nn.Module], method: str,
                   modules_to_save: Iterable[str] | None = None, dropout: float = 0.0) -> nn.Module:
    """`inject` for the methods that wrap nn.Linear layers (LoRA, QLoRA, AdaLoRA, SoRA):
    `make(name, linear)` builds the wrapper; a target that is not an nn.Linear, or a
    ValueError from `make` (a rank that does not fit), is reported with the module's name."""
    check_dropout(dropout)

    def wrap(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name!r} is a {type(module).__name__}; {method} here targets "
                            "nn.Linear modules only")
        try:
            return make(name, module)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    return inject(model, target_modules, wrap, modules_to_save, what=f"{method} layers")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). Tied weights are counted once. A weight stored as packed codes (a
    Linear4bit's buffer, declared through its `stored_weight_numel`) counts as the parameters
    it stands for, so a QLoRA model has the same total as its LoRA twin (bitsandbytes' too)."""
    seen, trainable = set(), 0
    total = sum(getattr(m, "stored_weight_numel", 0) for m in model.modules())
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # bitsandbytes' 4-bit Params4bit holds packed bytes; its quant_state knows the shape
        qs = getattr(p, "quant_state", None)
        n = math.prod(qs.shape) if qs is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_parameters(model: nn.Module) -> int:
    return count_parameters(model)[0]
