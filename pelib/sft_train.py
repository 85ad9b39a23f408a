"""The instruction-tuning run (`pelib finetune --task sft`): train a causal LM to write the
label's name, then score what it writes.

The loop is pelib.train's, with the classifier's parts swapped for pelib.sft's: rows are chat
conversations (prompt, answer, eos) with the loss on the answer only, batches are padded on the
right, and the loss is the chunked linear cross-entropy on the labelled positions (the B x T x V
logits are never made). AdamW's groups, the schedule, length-grouped batches, checkpoints and a
method's hooks (SoRA's proximal step, AdaLoRA's allocator and regulariser) are the same objects
the classifier's loop uses, so a method trains here by the same rule and a killed run resumes
to the same numbers.

The zero-shot row (`--method zero-shot`, `zero_shot` below) is the table's floor: the untrained
Instruct model, the label names listed in its prompt, scored the same way, 0 steps.

Evaluation is by generation: greedy decoding with the KV cache, free (the model may write
anything) or constrained to the label names, then pelib.metrics.generation_metrics, where an
output that is no label name is a class of its own.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .hooks import check_hooks
from .inject import count_parameters
from .measure import PeakMemory
from .metrics import generation_metrics
from .sft import collate_train, encode, generate_answers, sft_loss
from .train import TrainConfig, TrainResult, begin_epoch, check_weights, end_epoch, optimizer_step, start_loop


def encode_rows(tokenizer, data, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every row of a split, or a ValueError naming the first row that
    does not fit max_length."""
    rows = []
    for i, (text, y) in enumerate(zip(data.texts, data.labels)):
        try:
            rows.append(encode(tokenizer, text, data.label_names[y], max_length))
        except ValueError as e:
            raise ValueError(f"training row {i}: {e} (--max-length)") from None
    return rows


def check_model(model: nn.Module) -> None:
    """sft_loss reads the causal LM's trunk (`model.model`) and its LM head (`model.lm_head`)."""
    if not (hasattr(model, "lm_head") and hasattr(model, "model")):
        raise ValueError(f"{type(model).__name__} is not a causal LM with an LM head (model.model "
                         "and model.lm_head); build it with task='causal_lm'")


def train_sft(model: nn.Module, tokenizer, train_data, eval_data, cfg: TrainConfig, hooks=(),
              constrained: bool = False) -> tuple[TrainResult, list[str]]:
    """Instruction-tune the trainable parameters of `model` on train_data, then generate the
    answer to every eval_data row; returns the result (metrics by generation) and the outputs.

    cfg is the classifier loop's TrainConfig (its head_lr and label_smoothing are unused: there
    is no head). With cfg.checkpoint set the run saves its state every cfg.checkpoint_every
    steps and at each epoch end, and resumes from that file when started again."""
    check_model(model)
    hooks = check_hooks(hooks)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = next(model.parameters()).device
    rows, pad_id = encode_rows(tokenizer, train_data, cfg.max_length), tokenizer.pad_token_id
    total, optimizer, scheduler, result, loop = start_loop(model, cfg, hooks, len(rows))
    model.train()
    bar = tqdm(total=total, initial=loop["step"], desc="sft", disable=not cfg.progress,
               dynamic_ncols=True)
    start = time.perf_counter() - loop["seconds"]

    def micro_loss(index: list[int]) -> torch.Tensor:
        batch = {n: t.to(device) for n, t in collate_train([rows[i] for i in index],
                                                             pad_id).items()}  # (B, T) each
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = sft_loss(model, batch)  # mean over the batch's answer tokens
        for h in hooks:
            loss = h.loss(model, loss)
        return loss

    with PeakMemory(device) as mem:
        while loop["step"] < total:
            batches = begin_epoch(loop, rng, [len(x) for x, _ in rows], cfg.batch_size)
            while loop["k"] < len(batches) and loop["step"] < total:
                micro = batches[loop["k"]:loop["k"] + cfg.grad_accum]
                optimizer_step(loop, micro, micro_loss, model, optimizer, scheduler, hooks, cfg, bar)
                if cfg.checkpoint and loop["step"] % cfg.checkpoint_every == 0 and loop["step"] < total:
                    loop["seconds"] = time.perf_counter() - start
                    save_checkpoint(cfg.checkpoint, model, optimizer, scheduler, hooks, loop, cfg)
            end_epoch(loop, rng, model, None, None, pad_id, cfg, None)  # no dev split: loss only
            if cfg.checkpoint and loop["step"] < total:
                loop["seconds"] = time.perf_counter() - start
                save_checkpoint(cfg.checkpoint, model, optimizer, scheduler, hooks, loop, cfg)
    bar.close()
    check_weights(model, loop["step"], cfg.lr)
    result.train_seconds = time.perf_counter() - start
    result.seconds_per_step = result.train_seconds / loop["step"]
    result.steps, result.resumed_at_step = loop["step"], loop["resumed_at"]
    result.peak_memory_mb, result.memory_kind = mem.mb, mem.kind
    return result, score(model, tokenizer, eval_data, cfg, result, constrained)


def score(model: nn.Module, tokenizer, eval_data, cfg: TrainConfig, result: TrainResult,
          constrained: bool, zero_shot: bool = False) -> list[str]:
    """Generate the answer to every eval_data row and put the metrics and the generation's
    seconds into result; returns the answers."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        out = generate_answers(model, tokenizer, eval_data.texts, eval_data.label_names,
                               constrained=constrained, zero_shot=zero_shot,
                               batch_size=cfg.eval_batch_size, progress=cfg.progress)
    result.eval_seconds = time.perf_counter() - t0
    result.metrics = generation_metrics(eval_data.labels, out.predictions,
                                        len(eval_data.label_names))
    return out.texts


def zero_shot(model: nn.Module, tokenizer, eval_data, cfg: TrainConfig,
              constrained: bool = False) -> tuple[TrainResult, list[str]]:
    """The floor of the instruction-tuning table: the model as it is (0 trainable parameters,
    0 steps) writes the answer to every eval_data row, asked with every label name listed in its
    prompt (pelib.sft.prompt_ids with the names); scored as train_sft's outputs are. The peak memory is
    the generation's, as there is no training to measure."""
    check_model(model)
    result = TrainResult(metrics={}, config=asdict(cfg))
    result.trainable_params, result.total_params = count_parameters(model)
    if result.trainable_params:
        raise ValueError(f"a zero-shot row trains nothing, and this model has "
                         f"{result.trainable_params:,} trainable parameters; freeze it first "
                         "(model.requires_grad_(False))")
    with PeakMemory(next(model.parameters()).device) as mem:
        texts = score(model, tokenizer, eval_data, cfg, result, constrained, zero_shot=True)
    result.peak_memory_mb, result.memory_kind = mem.mb, mem.kind
    return result, texts
