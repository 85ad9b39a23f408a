"""One training loop for every method: AdamW, warmup + linear (or cosine) decay, gradient accumulation,
optional bf16 autocast, length-grouped batches, evaluation, wall time and peak memory.

Methods plug in through hooks instead of editing the loop. A hook is any object with some of:
    param_groups(model) -> list of AdamW param-group dicts (e.g. SoRA's gates with their own lr)
    loss(model, loss)   -> loss   (e.g. AdaLoRA adds its orthogonality regulariser)
    begin(model, optimizer, total_steps)   called once before the first step (schedules
                                  that need the run's length, a prox step that needs the lr)
    step(model, step)             called after optimizer.step(), before zero_grad(), so the
                                  gradients are still there (AdaLoRA's allocator, SoRA's prox)
"""
from __future__ import annotations

import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .classifier import split_head
from .distributed import ProcessGroup, process_group
from .files import atomic_write
from .inject import CLASSIFIER_HEADS, count_parameters
from .lora import LoRAConfig
from .measure import PeakMemory
from .metrics import classification_metrics
from .probe import fit_probe
from .recipe import Recipe

HEAD_INITS = ("random", "probe")
SCHEDULES = ("linear", "cosine", "constant")  # the lr's shape after the warm-up


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
        for k in ("batch_size", "grad_accum", "max_length", "eval_batch_size"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.weight_decay < math.inf:  # also refuses nan
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio is a share of the steps in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing is a share of the target in [0, 1), got "
                             f"{self.label_smoothing}")
        for k in ("epochs", "lr", "head_lr", "max_grad_norm"):
            v = getattr(self, k)
            if k in ("head_lr", "max_grad_norm") and v is None:
                continue
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{k} must be a finite number > 0, got {v}")


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


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort within windows of 50 batches by length, cut into batches, shuffle those:
    random order, little padding (2.3x faster an epoch than plain shuffling, measured here)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(ids: list[list[int]], index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(ids[i]) for i in index)
    input_ids = torch.full((len(index), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), T), dtype=torch.long)
    for row, i in enumerate(index):  # right padding
        input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
        mask[row, :len(ids[i])] = 1
    return dict(input_ids=input_ids, attention_mask=mask)


@torch.no_grad()
def predict(model: nn.Module, ids: list[list[int]], pad_id: int, batch_size: int = 128,
            bf16: bool = False, group: ProcessGroup | None = None) -> torch.Tensor:
    """Predicted labels of every row; with several processes each predicts its share (rows
    r, r + W, ...) and the shares are gathered, so the split is covered once."""
    group = group or ProcessGroup()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = range(group.rank, len(ids), group.world)
    order = sorted(mine, key=lambda i: len(ids[i]))  # little padding
    preds = torch.empty(len(ids), dtype=torch.long)
    for k in range(0, len(order), batch_size):
        index = order[k:k + batch_size]
        batch = {n: t.to(device) for n, t in collate(ids, index, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            preds[index] = model(**batch).logits.argmax(-1).cpu()
    model.train(was_training)
    for r, (index, p) in enumerate(group.gather((list(mine), preds[list(mine)]))):
        preds[index] = p
    return preds


def evaluate(model, tokenizer, data, max_length=64, batch_size=128, bf16=False,
             group: ProcessGroup | None = None) -> dict:
    ids = encode(tokenizer, data.texts, max_length)
    return classification_metrics(data.labels, predict(model, ids, tokenizer.pad_token_id,
                                                       batch_size, bf16, group))


def make_optimizer(model: nn.Module, cfg: TrainConfig, hooks) -> torch.optim.AdamW:
    groups, taken = [], set()
    for h in hooks:
        for g in getattr(h, "param_groups", lambda m: [])(model):
            groups.append(g)
            taken |= {id(p) for p in g["params"]}
    if cfg.head_lr is not None:  # the classification head (also inside peft's wrapper)
        head = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in taken
                and set(CLASSIFIER_HEADS) & set(n.split("."))]
        if head:
            groups += decay_groups(head, cfg.weight_decay, lr=cfg.head_lr)
            taken |= {id(p) for p in head}
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in taken]
    if not rest and not groups:
        raise ValueError("the model has no trainable parameters; inject a method first")
    if cfg.layer_decay == 1:
        main = decay_groups([p for _, p in rest], cfg.weight_decay)
    else:  # one group per depth, from the embeddings (depth 0) up
        layers = model.config.num_hidden_layers
        depth = {id(p): depth_of(n, layers) for n, p in rest}
        main = [g for d in sorted(set(depth.values())) for g in decay_groups(
            [p for _, p in rest if depth[id(p)] == d], cfg.weight_decay,
            lr=cfg.lr * cfg.layer_decay ** (layers + 1 - d))]
    return torch.optim.AdamW(main + groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def depth_of(name: str, layers: int) -> int:
    """0 for the embeddings, l + 1 for transformer layer l (BERT's `layer.l.`, Llama's
    `layers.l.`), layers + 1 for what sits above the last layer (pooler, final norm)."""
    m = re.search(r"\blayers?\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return 0 if "embed" in name else layers + 1


def decay_groups(params: list, weight_decay: float, **extra) -> list[dict]:
    """AdamW's decoupled weight decay on the weight matrices only, as in BERT's recipe (Devlin et
    al. 2019): biases and LayerNorm scales (1-d) are not pulled towards 0. One group without it."""
    if not weight_decay:
        return [dict(params=params, **extra)] if params else []
    split = (dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay, **extra),
             dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, **extra))
    return [g for g in split if g["params"]]


def lr_schedule(total: int, warmup: int, schedule: str = "linear"):
    """The lr factor of step s: up in a straight line over `warmup` steps, then `schedule`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup  # step 0 already learns (a factor of 0 would waste it)
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return max(0.0, (total - s) / max(1, total - warmup))
        progress = min(1.0, (s - warmup) / max(1, total - warmup))  # 0 -> 1 over the decay
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps `train` will take: schedules (AdaLoRA's budget, SoRA's sparsity) need it."""
    per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum)
    return max(1, round(cfg.epochs * per_epoch))


# What decides the numbers of a run: a checkpoint is only resumed under the same values.
_RUN_KEYS = ("epochs", "lr", "head_lr", "batch_size", "grad_accum", "max_length", "warmup_ratio",
             "schedule", "weight_decay", "label_smoothing", "layer_decay", "bf16", "seed",
             "head_init", "run")


def save_checkpoint(path, model, optimizer, scheduler, hooks, loop: dict, cfg: TrainConfig) -> None:
    """Everything a resumed run needs to continue bit for bit: the trainable tensors, AdamW's
    moments, the schedule, the RNG states, where in which epoch we are, and each hook's
    state (a hook with state must define state_dict / load_state_dict)."""
    state = dict(
        run={k: getattr(cfg, k) for k in _RUN_KEYS},
        trainable={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        hooks=[h.state_dict() if hasattr(h, "state_dict") else None for h in hooks],
        torch_rng=torch.get_rng_state(), loop=loop)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, model, optimizer, scheduler, hooks, cfg: TrainConfig) -> dict:
    try:  # weights_only: a checkpoint holds tensors and plain values; nothing in it may run code
        state = torch.load(path, weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that asks for code: never trusted
        raise ValueError(f"checkpoint {path} cannot be read as a pelib checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); delete it to "
                         "start afresh") from None
    if not isinstance(state, dict) or not {"run", "trainable", "loop"} <= state.keys():
        raise ValueError(f"checkpoint {path} is not a pelib checkpoint; delete it to start afresh")
    run = {k: getattr(cfg, k) for k in _RUN_KEYS}
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


def frozen_trunk(model: nn.Module, cfg: TrainConfig, hooks, group: ProcessGroup):
    """(features, head) when the run trains the head alone on fixed features, else None:
    one process, no hooks, every trainable parameter in the head, no live dropout in the trunk."""
    parts = split_head(model) if cfg.cache_features and group.world == 1 and not hooks else None
    if parts is None:
        return None
    def in_head(name):  # the head and its own dropout are top-level modules of the classifier
        return name.split(".")[0] in (*CLASSIFIER_HEADS, "dropout")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    live_dropout = [n for n, m in model.named_modules()
                    if isinstance(m, nn.Dropout) and m.p > 0 and not in_head(n)]
    if not trainable or live_dropout or not all(map(in_head, trainable)):
        return None
    return parts


@torch.no_grad()
def trunk_features(features, model, ids, pad_id, batch_size, bf16) -> torch.Tensor:
    """(N, H): the trunk's pooled features of every row, in eval mode, length-sorted batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = None
    for k in range(0, len(order), batch_size):
        index = order[k:k + batch_size]
        batch = {n: t.to(device) for n, t in collate(ids, index, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f = features(**batch).float()
        if out is None:
            out = torch.empty(len(ids), f.shape[-1], device=device)
        out[index] = f
    model.train(was_training)
    return out


def probe_head(model: nn.Module, ids, labels: torch.Tensor, pad_id: int, cfg: TrainConfig) -> None:
    """LP-FT's first stage: the trainable head becomes the linear probe of the model's features
    as they are now (the adapters at their identity init), fitted to convergence."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's wrapper
    parts = split_head(base)
    if parts is None:
        raise ValueError(f"head_init='probe' needs a classifier pelib builds (mean-pooled BERT, "
                         f"[CLS] BERT or a Llama scorer), not {type(base).__name__}; use "
                         "head_init='random'")
    head = {n.rsplit(".", 1)[-1]: p for n, p in model.named_parameters()
            if p.requires_grad and set(CLASSIFIER_HEADS) & set(n.split("."))}
    if set(head) not in ({"weight"}, {"weight", "bias"}):
        raise ValueError(f"head_init='probe' needs one trainable linear head, found {sorted(head)}")
    z = trunk_features(parts[0], model, ids, pad_id, cfg.eval_batch_size, cfg.bf16).cpu()
    weight, bias = fit_probe(z, labels, head["weight"].shape[0], bias="bias" in head)
    with torch.no_grad():
        head["weight"].copy_(weight)
        if bias is not None:
            head["bias"].copy_(bias)


def train(model: nn.Module, tokenizer, train_data, eval_data, cfg: TrainConfig,
          hooks=(), dev_data=None) -> TrainResult:
    """Fine-tune the trainable parameters of `model` on train_data; evaluate on eval_data.

    With cfg.checkpoint set, the run saves its state every cfg.checkpoint_every steps and at
    each epoch end; started again on the same model (rebuilt the same way), it resumes from
    that file and ends with the same numbers as an uninterrupted run.
    """
    check_inputs(model, tokenizer, cfg)
    group = process_group()  # one process, or rank r of W under torchrun (pelib.distributed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = group.accelerator.device if group.world > 1 else next(model.parameters()).device
    model.to(device)
    ids = encode(tokenizer, train_data.texts, cfg.max_length)
    labels = torch.tensor(train_data.labels)
    dev_ids = encode(tokenizer, dev_data.texts, cfg.max_length) if dev_data else None
    total = total_steps(len(ids), cfg)
    optimizer = make_optimizer(model, cfg, hooks)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(total, round(cfg.warmup_ratio * total), cfg.schedule))
    trainable, n_total = count_parameters(model)
    result = TrainResult(metrics={}, trainable_params=trainable, total_params=n_total,
                         config=asdict(cfg))
    # The loop's own state; a checkpoint stores it, so a resumed run picks up mid-epoch.
    loop = dict(step=0, epoch=0, k=0, rng=None, rng_after=None, epoch_losses=[], seconds=0.0,
                losses=result.losses, history=result.history, eval_seconds=0.0, resumed_at=None)
    if cfg.checkpoint and os.path.exists(cfg.checkpoint):
        loop = load_checkpoint(cfg.checkpoint, model, optimizer, scheduler, hooks, cfg)
        loop["resumed_at"] = loop["step"]
        result.losses, result.history = loop["losses"], loop["history"]
    for h in hooks:  # after a resume: optimizer.load_state_dict made new param-group dicts
        getattr(h, "begin", lambda m, o, t: None)(model, optimizer, total)
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

    with PeakMemory(device) as mem:
        if cfg.head_init == "probe" and loop["step"] == 0:  # counted as training time
            probe_head(model, ids, labels, tokenizer.pad_token_id, cfg)
        trunk = frozen_trunk(model, cfg, hooks, group)
        if trunk is not None:  # counted as training time: it replaces the trunk's forwards
            feats = trunk_features(trunk[0], model, ids, tokenizer.pad_token_id,
                                   cfg.eval_batch_size, cfg.bf16)
        while loop["step"] < total:
            if loop["rng"] is None:  # a new epoch (else: resuming inside the saved one)
                if loop["rng_after"] is not None:  # where the last epoch's shuffles left it
                    rng.setstate(loop["rng_after"])
                loop["epoch"] += 1
                loop["rng"], loop["k"], loop["epoch_losses"] = rng.getstate(), 0, []
            rng.setstate(loop["rng"])
            batches = length_grouped_batches([len(x) for x in ids], cfg.batch_size, rng)
            while loop["k"] < len(batches) and loop["step"] < total:
                micro = batches[loop["k"]:loop["k"] + cfg.grad_accum]  # accumulated batches
                loss_sum = 0.0
                for index in micro:
                    # this process's rows; the scale makes DDP's average the global mean
                    shard = group.shard(index) or index[:1]
                    weight = len(group.shard(index)) * group.world / len(index)
                    y = labels[shard].to(device)
                    if trunk is not None:  # the head alone, on the cached features
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                            logits = trunk[1](feats[torch.tensor(shard, device=device)])
                        loss = nn.functional.cross_entropy(logits.float(), y,
                                                           label_smoothing=cfg.label_smoothing)
                    else:
                        batch = {n: t.to(device) for n, t in
                                 collate(ids, shard, tokenizer.pad_token_id).items()}
                        smooth = cfg.label_smoothing > 0  # then the loss from the logits, in fp32
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                            out = runner(**batch, labels=None if smooth else y)
                        loss = (nn.functional.cross_entropy(out.logits.float(), y,
                                                            label_smoothing=cfg.label_smoothing)
                                if smooth else out.loss)
                    if weight != 1:
                        loss = loss * weight
                    for h in hooks:
                        loss = getattr(h, "loss", lambda m, x: x)(model, loss)
                    (loss / len(micro)).backward()
                    loss_sum += loss.item() / len(micro)
                loss_sum = group.mean(loss_sum)
                if not math.isfinite(loss_sum):
                    raise FloatingPointError(f"loss became {loss_sum} at step {loop['step']}; lower "
                                             f"the learning rate (now {cfg.lr})")
                if cfg.max_grad_norm is not None:  # the averaged gradient, after DDP's all-reduce
                    nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                             cfg.max_grad_norm)
                optimizer.step()
                loop["step"] += 1
                for h in hooks:
                    getattr(h, "step", lambda m, s: None)(model, loop["step"])
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                loop["k"] += cfg.grad_accum
                result.losses.append(loss_sum)
                loop["epoch_losses"].append(loss_sum)
                bar.update(1)
                bar.set_postfix(epoch=loop["epoch"], loss=f"{loss_sum:.3f}")
                if cfg.checkpoint and loop["step"] % cfg.checkpoint_every == 0 and loop["step"] < total:
                    checkpoint()
            losses = loop["epoch_losses"]
            entry = dict(epoch=loop["epoch"], loss=sum(losses) / max(1, len(losses)))
            if dev_ids is not None:
                t0 = time.perf_counter()
                preds = predict(model, dev_ids, tokenizer.pad_token_id, cfg.eval_batch_size,
                                cfg.bf16, group)
                entry.update({f"dev_{k}": v for k, v in
                              classification_metrics(dev_data.labels, preds).items()})
                # as if dev were class-balanced like Banking77's test split (pelib.metrics)
                entry["dev_f1_balanced"] = classification_metrics(dev_data.labels, preds,
                                                                  balanced=True)["f1"]
                loop["eval_seconds"] += time.perf_counter() - t0
            result.history.append(entry)
            loop["rng"], loop["rng_after"] = None, rng.getstate()  # the epoch is done
            if cfg.checkpoint and loop["step"] < total:
                checkpoint()
    bar.close()
    result.eval_seconds = loop["eval_seconds"]
    result.train_seconds = time.perf_counter() - start - result.eval_seconds
    result.seconds_per_step = result.train_seconds / loop["step"]
    result.steps = loop["step"]
    result.resumed_at_step = loop["resumed_at"]
    result.peak_memory_mb, result.memory_kind = mem.mb, mem.kind
    result.world_size = group.world
    result.metrics = evaluate(model, tokenizer, eval_data, cfg.max_length, cfg.eval_batch_size,
                              cfg.bf16, group)
    return result
