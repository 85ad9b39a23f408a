"""Checkpoints of a training run: everything a resumed run needs to end with the numbers of an
uninterrupted one, and nothing that can run code when it is read back."""
from __future__ import annotations

import torch

from .files import atomic_write

# What decides the numbers of a run: a checkpoint is only resumed under the same values.
RUN_KEYS = ("epochs", "lr", "head_lr", "batch_size", "grad_accum", "max_length", "warmup_ratio",
            "schedule", "weight_decay", "label_smoothing", "layer_decay", "bf16", "seed",
            "head_init", "run")


def save_checkpoint(path, model, optimizer, scheduler, hooks, loop: dict, cfg) -> None:
    """The trainable tensors, AdamW's moments, the schedule, the RNG state, where in which epoch
    the loop is (`loop`), and each hook's state (pelib.hooks.Hook.state_dict)."""
    state = dict(
        run={k: getattr(cfg, k) for k in RUN_KEYS},
        trainable={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        hooks=[h.state_dict() for h in hooks], torch_rng=torch.get_rng_state(), loop=loop)
    try:  # a full disk: the temporary goes, the last complete checkpoint stays
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def load_checkpoint(path, model, optimizer, scheduler, hooks, cfg) -> dict:
    """Restore what save_checkpoint saved into a model built the same way; return the loop's
    state. A checkpoint of other settings or other trainable tensors is refused."""
    try:  # weights_only: a checkpoint holds tensors and plain values; nothing in it may run code
        state = torch.load(path, weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that asks for code: never trusted
        raise ValueError(f"checkpoint {path} cannot be read as a pelib checkpoint "
                         f"({type(e).__name__}: {(str(e).splitlines() or ['empty'])[0][:200]}); delete it to "
                         "start afresh") from None
    if not isinstance(state, dict) or not {"run", "trainable", "loop"} <= state.keys():
        raise ValueError(f"checkpoint {path} is not a pelib checkpoint; delete it to start afresh")
    run = {k: getattr(cfg, k) for k in RUN_KEYS}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    shapes = {n: tuple(t.shape) for n, t in state["trainable"].items()}
    if state["run"] != run or shapes != {n: tuple(p.shape) for n, p in params.items()}:
        raise ValueError(f"checkpoint {path} belongs to another run (settings {state['run']} vs "
                         f"{run}, or other trainable tensors); delete it to start afresh")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["trainable"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for h, hs in zip(hooks, state["hooks"]):
        if hs is not None:
            h.load_state_dict(hs)
    torch.set_rng_state(state["torch_rng"])
    return state["loop"]
