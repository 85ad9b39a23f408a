"""`python -m pelib finetune`: fine-tune a packaged backbone on a packaged data set, one run.

    python -m pelib finetune --model minilm --data banking77 --method lora --r 8 --epochs 3
    python -m pelib finetune --model smollm2 --data banking77 --task sft --method lora

`--task classify` (the default) trains a fresh classification head with the method; `--task
sft` instruction-tunes the causal LM to write the label's name and scores its greedy outputs
(pelib.sft_train: one epoch, batch 16, the answer-only chunked loss; pelib.recipe.TASKS).

prints a result table and writes results/<run>.json (metrics, trainable parameters, time, peak
memory, config) and results/<run>_loss.png; with `--save-adapter DIR`, the trained adapter in
peft's format too (the method's `save`, pelib.methods; the record's "adapter"). The options
come from pelib.options (the method options from the registry's configs), the run's name, lock
and record from pelib.runs, the table and the figure from pelib.report; this module turns
options into a run.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

from . import distributed
from .backbone import DEFAULT_TARGETS
from .files import writable_dir
from .measure import cpu_has_fast_bf16
from .methods import METHODS, Run
from .options import check, config_of, options, parse
from .report import plot_losses, table
from .runs import (
    check_outputs,
    numbers,
    only_process,
    refuse_other_run,
    run_ledger,
    run_name,
    same_run,
    write_record,
)

# what callers reach through pelib.finetune
__all__ = ["finetune", "build", "parse", "options", "same_run", "check"]


def device_of(args) -> str:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU; use --device auto or cpu")
    return "cuda" if args.device == "cuda" or (args.device == "auto" and
                                               torch.cuda.is_available()) else "cpu"


def uses_bf16(args) -> bool:
    """bf16 autocast unless --fp32: on a GPU, and on a CPU with bf16 hardware or with --bf16."""
    if args.fp32:
        return False
    return args.bf16 or device_of(args) == "cuda" or cpu_has_fast_bf16()


def bf16_base(args) -> bool:
    """Store the frozen weights in bf16 (pelib.backbone.cast_frozen)? --base-dtype auto: when
    training runs in bf16; bf16 without bf16 training is refused."""
    if args.base_dtype == "bf16" and not uses_bf16(args):
        raise ValueError("--base-dtype bf16 stores the frozen weights for bf16 training, which is "
                         "off here (no bf16 hardware in this CPU); add --bf16, or use --base-dtype auto")
    return args.base_dtype != "fp32" and uses_bf16(args)


def uses_kernels(args) -> bool:
    """pelib's Triton kernels (pelib.patch) on a GPU for the Llama backbone, unless --no-kernels."""
    return device_of(args) == "cuda" and args.model == "smollm2" and not args.no_kernels


def build(args, cfg):
    """The model with the method injected, its tokenizer, the train split and the hooks."""
    import torch

    from .backbone import load_backbone, tiny_backbone
    from .data import load_nlu
    from .train import total_steps

    data = load_nlu(args.data, "train", limit=args.train_limit, seed=args.seed)
    check_epochs(args, len(data.texts))
    n_labels = len(data.label_names)
    if args.task == "sft":  # the causal LM itself: no new head, nothing random in it
        task = dict(task="causal_lm", num_labels=None)
    else:
        task = dict(num_labels=n_labels, pooling=args.pooling)
    if args.tiny:
        model, tokenizer = tiny_backbone(args.model, seed=args.seed, **task)
    else:
        torch.manual_seed(args.seed)  # the new classification head
        model, tokenizer = load_backbone(args.model, **task)
    device = device_of(args)
    config = config_of(args)
    run = Run(targets=getattr(config, "targets", None) or DEFAULT_TARGETS[args.model],
              total_steps=total_steps(len(data.texts), cfg), device=device)
    model, hooks = METHODS[args.method].build[args.impl](model, config, run)
    model.to(device)
    if bf16_base(args):  # else autocast casts every frozen weight again on every forward
        from .backbone import cast_frozen

        cast_frozen(model, torch.bfloat16)
    if uses_kernels(args):
        from .patch import patch

        patch(model)  # RMSNorm, RoPE, SwiGLU and the LoRA linears on Triton kernels
    return model, tokenizer, data, hooks


def finetune(args) -> dict:
    """One run: build, train, evaluate, write the record and the loss curve; return the record.
    Bad options raise ValueError with a message that names the fix."""
    distributed.check_launch()
    check(args)
    bf16_base(args)  # refuses a bf16 base without bf16 training, before anything is written
    name = run_name(args)
    if args.task == "sft" and os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("--task sft trains in one process; start it without torchrun")
    if distributed.rank() != 0:  # under torchrun: rank 0 alone checks, locks and writes
        record = _finetune(args, Path(args.out), name)
    else:
        out = writable_dir(args.out)
        check_outputs(out, name)
        if args.save_adapter is not None:  # where the adapter goes, before training
            check_adapter_dir(writable_dir(args.save_adapter, "--save-adapter"), args.overwrite)
        with only_process(out, name):
            record = _finetune(args, out, name)
    distributed.finish()  # under torchrun: every process leaves the group after rank 0 wrote
    return record


def check_adapter_dir(folder: Path, overwrite: bool) -> None:
    """An adapter already in --save-adapter DIR is replaced only with --overwrite (the folder's
    other files are never touched: save_adapter writes its two files alone)."""
    from .io import CONFIG_NAME, WEIGHTS_NAME

    there = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if os.path.lexists(folder / n)]
    if there and not overwrite:
        raise ValueError(f"--save-adapter {folder} holds an adapter already ({', '.join(there)}); "
                         "pass --overwrite to replace it, or another --save-adapter DIR")


def check_epochs(args, rows: int) -> None:
    """--epochs below one optimizer step would train one step and call it a fraction of an
    epoch (the record's time per epoch then extrapolates one step to millions of seconds)."""
    per_epoch = math.ceil(math.ceil(rows / args.batch_size) / args.grad_accum)
    if args.epochs * per_epoch < 1:
        raise ValueError(f"--epochs {args.epochs:g} is less than one optimizer step (an epoch of "
                         f"{rows} rows is {per_epoch} steps of --batch-size {args.batch_size}); "
                         f"use --epochs >= {1 / per_epoch:.3g}")


def blame(args, config, cfg, error: FloatingPointError) -> ValueError:
    """The loss overflowed: name the option furthest above the method's recipe. A LoRA-family
    update moves the output by about lr * alpha / r, so either can be the cause."""
    recipe = type(config)()
    factors = {"--lr": (cfg.lr / recipe.lr, cfg.lr, recipe.lr)}
    r = getattr(config, "r", None) or getattr(config, "init_r", None)
    if getattr(args, "alpha", None) is not None and r:
        r0 = getattr(recipe, "r", None) or recipe.init_r
        factors["--alpha"] = ((config.alpha / r) / (recipe.alpha / r0), config.alpha, recipe.alpha * r / r0)
    flag, (factor, value, usual) = max(factors.items(), key=lambda kv: kv[1][0])
    what = str(error).split(";")[0]  # "loss became nan at step 3"
    if factor <= 1:
        return ValueError(f"the {what}, at the recipe's settings; clip the gradient with "
                          "--max-grad-norm 1 or lower --lr")
    return ValueError(f"the {what}: {flag} {value:g} is {factor:.3g} times the recipe's "
                      f"{usual:g}; lower {flag}")


def _finetune(args, out: Path, name: str) -> dict:
    from .data import load_nlu
    from .train import TrainConfig, train

    if distributed.rank() == 0 and not args.overwrite:
        refuse_other_run(out / f"{name}.json", options(args))
    ckpt = out / f"{name}.ckpt" if args.resume else None
    method, config = METHODS[args.method], config_of(args)
    sft = args.task == "sft"
    trains_nothing = args.method == "zero-shot"  # the SFT table's floor: 0 steps, no loss curve
    label_smoothing = 0.0 if sft else config.label_smoothing if args.label_smoothing is None \
        else args.label_smoothing
    cfg = TrainConfig.of(config, lr=args.lr, head_lr=args.head_lr, label_smoothing=label_smoothing,
                         epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         max_length=args.max_length, bf16=uses_bf16(args), seed=args.seed,
                         progress=not args.no_progress, checkpoint=ckpt and str(ckpt),
                         checkpoint_every=args.checkpoint_every,
                         max_grad_norm=args.max_grad_norm, head_init=args.head_init,
                         weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                         schedule=args.schedule, layer_decay=args.layer_decay,
                         run=numbers(options(args)))
    model, tokenizer, data, hooks = build(args, cfg)
    evaluation = load_nlu(args.data, args.eval_split, limit=args.eval_limit, seed=args.seed)
    extra = {}
    try:
        if sft:
            from .sft_train import train_sft, zero_shot

            result, texts = zero_shot(model, tokenizer, evaluation, cfg, args.constrained) \
                if trains_nothing else train_sft(model, tokenizer, data, evaluation, cfg,
                                                 hooks=hooks, constrained=args.constrained)
            extra = dict(task="sft", decoding="constrained" if args.constrained else "greedy",
                         generate_seconds=result.eval_seconds, outputs=texts[:20])
        else:
            dev = load_nlu(args.data, "dev", limit=args.eval_limit, seed=args.seed)
            result = train(model, tokenizer, data, evaluation, cfg, hooks=hooks, dev_data=dev)
    except FloatingPointError as e:
        raise blame(args, config, cfg, e) from None
    record = dict(name=name, **asdict(result), seconds_per_epoch=result.train_seconds / args.epochs,
                  args=options(args), eval_split=args.eval_split,
                  train_rows=0 if trains_nothing else len(data.texts),
                  eval_rows=len(evaluation.texts), device=device_of(args), bf16=uses_bf16(args),
                  kernels=uses_kernels(args), base_dtype="bf16" if bf16_base(args) else "fp32",
                  ledger=run_ledger(model, tokenizer, data, cfg, args.task)
                  if result.world_size == 1 else None, **extra)
    if distributed.rank() != 0:
        return record  # the same weights and metrics as rank 0's, which writes them
    path = out / f"{name}.json"
    write_record(path, record)  # first: nothing after it (a report, an export) can lose the run
    if result.losses:
        plot_losses(result.losses, out / f"{name}_loss.png", name)
    if ckpt and ckpt.exists():
        ckpt.unlink()  # the results are written: nothing left to resume
    if method.report:
        try:
            record[args.method] = method.report(model, hooks, config, result.steps)
        except ValueError as e:
            raise ValueError(f"{e} (the run's record {path} is written)") from None
        write_record(path, record)
    if args.save_adapter is not None:
        try:
            saved = method.save(model, args.save_adapter)
        except ValueError as e:
            raise ValueError(f"{e} (the run's record {path} is written)") from None
        record["adapter"] = args.save_adapter if saved else None
        write_record(path, record)
        if saved:
            print(f"wrote the adapter to {args.save_adapter}")
    print(table([record]))
    print(f"wrote {out / name}.json" + (f" and {out / name}_loss.png" if result.losses else ""))
    return record
