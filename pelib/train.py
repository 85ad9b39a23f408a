"""One training loop for every method: AdamW, warm-up then a linear (or cosine) decay,
gradient accumulation, optional bf16 autocast, length-grouped batches, a dev evaluation per
epoch, checkpoints to resume from, wall time and peak memory.

The loop knows no method. A method's training rule is a hook (pelib.hooks: its protocol and
events); so are LP-FT's probe head and the floor's feature cache, which the loop adds itself
(cfg.head_init, cfg.cache_features). Its parts live beside it: batching (batches), optim
(AdamW's groups), schedule (the lr's shape, the run's length), checkpoint, evaluation, and
settings (the one check of these options, shared with the command line).
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .batching import collate, encode, length_grouped_batches
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import process_group
from .evaluation import dev_metrics, evaluate
from .hooks import FeatureCache, ProbeHead, Rows, check_hooks
from .inject import count_parameters
from .lora import LoRAConfig
from .measure import PeakMemory
from .optim import make_optimizer
from .recipe import Recipe
from .schedule import lr_schedule, total_steps
from .settings import check_data, check_settings

# what notebooks and benches reach through pelib.train
__all__ = ["TrainConfig", "TrainResult", "train", "encode", "collate", "length_grouped_batches",
           "total_steps", "evaluate"]


@dataclass
class TrainConfig:
    """The loop's settings. lr, head_lr and label_smoothing default to LoRA's recipe
    (pelib.lora.LoRAConfig); `TrainConfig.of(config)` takes another method's."""

    epochs: float = 3
    lr: float = LoRAConfig.lr
    # The fresh classification head's own lr (None: lr). A random 77-way head learning at an
    # adapter's lr lags the adapter; at the probe's lr it does not (docs/benchmarks.md).
    head_lr: float | None = LoRAConfig.head_lr
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 64
    warmup_ratio: float = 0.06
    # After the warm-up the lr falls to 0 in a straight line (BERT's recipe), along half a cosine
    # (Loshchilov & Hutter 2017), or stays at lr (constant).
    schedule: str = "linear"
    weight_decay: float = 0.0
    # Label smoothing (Szegedy et al. 2016): the target puts 1 - eps on the label and eps / K on
    # every one of the K classes. 0: plain cross-entropy, the model's own loss.
    label_smoothing: float = LoRAConfig.label_smoothing
    # Layer-wise lr decay (ULMFiT's discriminative fine-tuning; Sun et al. 2019 and ELECTRA for
    # BERT): layer l of L learns at lr * layer_decay ** (L - l), the embeddings one step lower,
    # the head at its own lr. 1.0: every layer at lr.
    layer_decay: float = 1.0
    bf16: bool = False
    seed: int = 0
    eval_batch_size: int = 128
    progress: bool = True
    checkpoint: str | None = None  # a file: saved during training, resumed from if it exists
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and at every epoch end)
    # Only the head trains and the trunk has no dropout: compute the trunk's features once per
    # row instead of every epoch (same numbers; the floor's 3 epochs cost about one forward pass)
    cache_features: bool = True
    # Clip the global gradient norm before each step (transformers' Trainer clips at 1.0). Off by
    # default: the tables were measured without it. Prefix tuning's loss spiked without it.
    max_grad_norm: float | None = None
    # "probe": before the first step, fit the head as a linear probe on the frozen features
    # (LP-FT, pelib.probe), so the backbone starts from a head that already reads it well.
    head_init: str = "random"
    # What else decides the run's numbers (the method's options, data subset...): a checkpoint
    # is resumed only under equal values. `pelib finetune` puts all its options here.
    run: dict = field(default_factory=dict)

    @classmethod
    def of(cls, config: Recipe, **settings) -> "TrainConfig":
        """The loop's settings for a method's config: its lr, head lr and label smoothing, then
        `settings`. A method whose config has no head lr (the floor) trains its head at lr."""
        lr, head_lr = settings.pop("lr", None), settings.pop("head_lr", None)
        lr = config.lr if lr is None else lr
        head_lr = head_lr if head_lr is not None else config.head_lr or lr
        return cls(lr=lr, head_lr=head_lr,
                   label_smoothing=settings.pop("label_smoothing", config.label_smoothing),
                   **settings)

    def __post_init__(self):
        check_settings(vars(self))


@dataclass
class TrainResult:
    metrics: dict  # on the evaluation split after training
    history: list = field(default_factory=list)  # per epoch: {"epoch", "loss", **eval metrics}
    losses: list = field(default_factory=list)  # per optimizer step
    trainable_params: int = 0
    total_params: int = 0
    train_seconds: float = 0.0  # optimizer steps only: the per-epoch dev evaluation is excluded
    eval_seconds: float = 0.0
    seconds_per_step: float = 0.0
    peak_memory_mb: float = 0.0
    memory_kind: str = ""
    steps: int = 0
    resumed_at_step: int | None = None  # set when the run continued from a checkpoint
    world_size: int = 1  # processes that trained together (pelib.distributed)
    config: dict = field(default_factory=dict)


def check_inputs(model: nn.Module, tokenizer, cfg: TrainConfig) -> None:
    """Settings that would train something else than asked, refused before the first step."""
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError("the adapter is merged into the base weights, so it would get no "
                         "gradient; call pelib.lora.unmerge(model) before training")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:
        raise ValueError(f"max_length {cfg.max_length} exceeds the model's {limit} position "
                         f"embeddings; use max_length <= {limit}")
    specials = tokenizer.num_special_tokens_to_add()  # [CLS] and [SEP] for BERT
    if cfg.max_length <= specials:  # the tokenizer would then not truncate at all
        raise ValueError(f"max_length {cfg.max_length} leaves no room for text besides the "
                         f"tokenizer's {specials} special tokens; use max_length >= {specials + 1}")


def start_loop(model: nn.Module, cfg: TrainConfig, hooks, rows: int):
    """What a loop starts from: its step count, optimizer, schedule, result and its own state,
    restored from cfg.checkpoint when that file exists (a resumed run picks up mid-epoch)."""
    total = total_steps(rows, cfg)
    optimizer = make_optimizer(model, cfg, hooks)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(total, round(cfg.warmup_ratio * total), cfg.schedule))
    result = TrainResult(metrics={}, config=asdict(cfg))
    result.trainable_params, result.total_params = count_parameters(model)
    loop = dict(step=0, epoch=0, k=0, rng=None, rng_after=None, epoch_losses=[], seconds=0.0,
                losses=result.losses, history=result.history, eval_seconds=0.0, resumed_at=None)
    if cfg.checkpoint and os.path.exists(cfg.checkpoint):
        loop = load_checkpoint(cfg.checkpoint, model, optimizer, scheduler, hooks, cfg)
        loop["resumed_at"] = loop["step"]
        result.losses, result.history = loop["losses"], loop["history"]
    for h in hooks:  # after a resume: optimizer.load_state_dict made new param-group dicts
        h.begin(model, optimizer, total)
    return total, optimizer, scheduler, result, loop


def optimizer_step(loop: dict, micro: list, micro_loss, model: nn.Module, optimizer, scheduler,
                   hooks, cfg: TrainConfig, bar, mean=lambda x: x) -> None:
    """One optimizer step over the accumulated batches `micro` (each a list of row indices):
    the backward of each batch's loss, the step's mean loss (over the processes by `mean`), the
    overflow check, clipping, the update, the hooks, the schedule and the loop's bookkeeping."""
    loss_sum = 0.0
    for index in micro:
        loss = micro_loss(index)
        (loss / len(micro)).backward()
        loss_sum += loss.item() / len(micro)
    loss_sum = mean(loss_sum)
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"loss became {loss_sum} at step {loop['step']}; lower "
                                 f"the learning rate (now {cfg.lr})")
    if cfg.max_grad_norm is not None:  # the averaged gradient, after DDP's all-reduce
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                 cfg.max_grad_norm)
    optimizer.step()
    loop["step"] += 1
    for h in hooks:  # the gradients are still there
        h.step(model, loop["step"])
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    loop["k"] += cfg.grad_accum
    loop["losses"].append(loss_sum)
    loop["epoch_losses"].append(loss_sum)
    bar.update(1)
    bar.set_postfix(epoch=loop["epoch"], loss=f"{loss_sum:.3f}")


def check_weights(model: nn.Module, step: int, lr: float) -> None:
    """The last step's loss was measured before its update: the weights it made are checked
    here, else an overflow there would be evaluated as if it were a model."""
    bad = next((n for n, p in model.named_parameters()
                if p.requires_grad and not torch.isfinite(p).all()), None)
    if bad is not None:
        raise FloatingPointError(f"weights became inf or nan at step {step} ({bad}); lower "
                                 f"the learning rate (now {lr})")


def train(model: nn.Module, tokenizer, train_data, eval_data, cfg: TrainConfig,
          hooks=(), dev_data=None) -> TrainResult:
    """Fine-tune the trainable parameters of `model` on train_data; evaluate on eval_data.

    With cfg.checkpoint set, the run saves its state every cfg.checkpoint_every steps and at
    each epoch end; started again on the same model (rebuilt the same way), it resumes from
    that file and ends with the same numbers as an uninterrupted run.
    """
    check_inputs(model, tokenizer, cfg)
    check_data(getattr(getattr(model, "config", None), "num_labels", None),
               {"train_data": train_data, "eval_data": eval_data, "dev_data": dev_data})
    hooks = check_hooks(hooks)
    hooks += [ProbeHead()] * (cfg.head_init == "probe") + [FeatureCache(hooks)] * cfg.cache_features
    group = process_group()  # one process, or rank r of W under torchrun (pelib.distributed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = group.accelerator.device if group.world > 1 else next(model.parameters()).device
    model.to(device)
    ids, pad_id = encode(tokenizer, train_data.texts, cfg.max_length), tokenizer.pad_token_id
    labels = torch.tensor(train_data.labels)
    dev_ids = encode(tokenizer, dev_data.texts, cfg.max_length) if dev_data else None
    total, optimizer, scheduler, result, loop = start_loop(model, cfg, hooks, len(ids))
    model.train()
    runner = group.wrap(model)  # DDP averages the gradients when W > 1; hooks see `model`
    bar = tqdm(total=total, initial=loop["step"], desc="train",
               disable=not cfg.progress or not group.main, dynamic_ncols=True)
    start = time.perf_counter() - loop["seconds"]

    def checkpoint():
        loop["seconds"] = time.perf_counter() - start
        if group.main:  # identical on every process: one writes
            save_checkpoint(cfg.checkpoint, model, optimizer, scheduler, hooks, loop, cfg)
        group.barrier()

    def micro_loss(index: list[int]) -> torch.Tensor:
        """The loss of one batch: this process's rows, scaled so DDP's average is the mean."""
        shard = group.shard(index) or index[:1]
        weight = len(group.shard(index)) * group.world / len(index)
        y = labels[shard].to(device)
        logits = next((z for h in hooks if (z := h.forward(model, shard)) is not None), None)
        smooth = logits is not None or cfg.label_smoothing > 0  # then the loss from the logits
        if logits is None:
            batch = {n: t.to(device) for n, t in collate(ids, shard, pad_id).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                out = runner(**batch, labels=None if smooth else y)
            logits = out.logits
        loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing) \
            if smooth else out.loss
        loss = loss * weight if weight != 1 else loss
        for h in hooks:
            loss = h.loss(model, loss)
        return loss

    with PeakMemory(device) as mem:
        for h in hooks:  # LP-FT's probe, the feature cache: counted as training time
            h.prepare(model, Rows(ids, labels, pad_id, cfg, group, loop["step"]))
        while loop["step"] < total:
            batches = begin_epoch(loop, rng, [len(x) for x in ids], cfg.batch_size)
            while loop["k"] < len(batches) and loop["step"] < total:
                micro = batches[loop["k"]:loop["k"] + cfg.grad_accum]  # accumulated batches
                optimizer_step(loop, micro, micro_loss, model, optimizer, scheduler, hooks, cfg, bar,
                               mean=group.mean)
                if cfg.checkpoint and loop["step"] % cfg.checkpoint_every == 0 and loop["step"] < total:
                    checkpoint()
            end_epoch(loop, rng, model, dev_ids, dev_data, pad_id, cfg, group)
            if cfg.checkpoint and loop["step"] < total:
                checkpoint()
    bar.close()
    check_weights(model, loop["step"], cfg.lr)
    result.eval_seconds = loop["eval_seconds"]
    result.train_seconds = time.perf_counter() - start - result.eval_seconds
    result.seconds_per_step = result.train_seconds / loop["step"]
    result.steps, result.resumed_at_step = loop["step"], loop["resumed_at"]
    result.peak_memory_mb, result.memory_kind = mem.mb, mem.kind
    result.world_size = group.world
    result.metrics = evaluate(model, tokenizer, eval_data, cfg.max_length, cfg.eval_batch_size,
                              cfg.bf16, group)
    return result


def begin_epoch(loop: dict, rng: random.Random, lengths: list[int], batch_size: int) -> list:
    """The batches of the epoch the loop is in: a new epoch starts where the last one's shuffles
    left the RNG; a resumed one replays its own start."""
    if loop["rng"] is None:  # a new epoch (else: resuming inside the saved one)
        if loop["rng_after"] is not None:
            rng.setstate(loop["rng_after"])
        loop["epoch"] += 1
        loop["rng"], loop["k"], loop["epoch_losses"] = rng.getstate(), 0, []
    rng.setstate(loop["rng"])
    return length_grouped_batches(lengths, batch_size, rng)


def end_epoch(loop: dict, rng, model, dev_ids, dev_data, pad_id, cfg, group) -> None:
    """The epoch's history entry: its mean loss and, with a dev split, the dev metrics."""
    losses = loop["epoch_losses"]
    entry = dict(epoch=loop["epoch"], loss=sum(losses) / max(1, len(losses)))
    if dev_ids is not None:
        t0 = time.perf_counter()
        entry.update(dev_metrics(model, dev_ids, dev_data.labels, pad_id, cfg.eval_batch_size,
                                 cfg.bf16, group))
        loop["eval_seconds"] += time.perf_counter() - t0
    loop["history"].append(entry)
    loop["rng"], loop["rng_after"] = None, rng.getstate()  # the epoch is done
