"""The peer library's builds: every peft (+ bitsandbytes) model pelib compares against.

`python -m pelib finetune --impl peft`, the benchmarks and the tests build their peer models
here and nowhere else, so "the peer" means one thing: the same base weights, the same targets
and hyperparameters, through peft's public API. peft and bitsandbytes are imported only when
a peer is built (they are test/dev dependencies, not pelib's).
"""
from __future__ import annotations

import tempfile

import torch
from torch import nn

from .hooks import Hook
from .inject import CLASSIFIER_HEADS


def _task_type(model: nn.Module):
    from peft import TaskType

    return TaskType.CAUSAL_LM if hasattr(model, "lm_head") else TaskType.SEQ_CLS


def lora(model: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0,
         use_rslora: bool = False, use_dora: bool = False) -> nn.Module:
    """peft's LoRA on `model` (its DoRA with `use_dora`)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        task_type=_task_type(model), r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=targets, use_rslora=use_rslora, use_dora=use_dora))


def quantized_4bit(model: nn.Module, device: str = "cpu") -> nn.Module:
    """The same weights reloaded through transformers' bitsandbytes NF4 + double quantisation
    (fp32 compute; the classification head or a causal LM's head kept dense, as pelib keeps
    them), on `device`."""
    from transformers import BitsAndBytesConfig

    from .backbone import quiet_transformers

    heads = [n for n in (*CLASSIFIER_HEADS, "lm_head") if hasattr(model, n)]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=heads)
    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():  # same weights and head
        model.save_pretrained(tmp)
        return type(model).from_pretrained(  # the same class: the same pooling
            tmp, quantization_config=config, dtype=torch.float32, device_map={"": device},
            attn_implementation=model.config._attn_implementation)


def qlora(model: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0,
          use_rslora: bool = False, device: str = "cpu") -> nn.Module:
    """The peer's QLoRA: bitsandbytes NF4 + DQ base (quantized_4bit), peft's LoRA on top."""
    return lora(quantized_4bit(model, device), targets, r, alpha, dropout, use_rslora)


class PeftAdaLoRA(Hook):
    """Training hook for peft's AdaLoRA: peft adds the regulariser in forward, but
    update_and_allocate must be called after every optimizer step, or peft silently trains
    plain LoRA (github.com/huggingface/peft/issues/1801)."""

    def __init__(self, model):
        self.model, self.history = model, []

    def state_dict(self) -> dict:  # for checkpoints: peft's allocator keeps its scores here
        ra = self.model.base_model.rankallocator
        return dict(history=self.history, ipt=ra.ipt, exp_avg_ipt=ra.exp_avg_ipt,
                    exp_avg_unc=ra.exp_avg_unc,
                    rank_pattern=self.model.peft_config["default"].rank_pattern)

    def load_state_dict(self, state: dict) -> None:
        ra = self.model.base_model.rankallocator
        self.history, ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc = (
            state["history"], state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"])
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]

    def step(self, model, step):
        model.base_model.update_and_allocate(step)
        pattern = model.peft_config["default"].rank_pattern
        ranks = None if pattern is None else \
            {k.removesuffix(".default").removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
        self.history.append(dict(step=step, ranks=ranks,
                                 budget=model.base_model.rankallocator.budget_schedule(step)[0]))


def adalora(model: nn.Module, targets, init_r: int, target_r: int, alpha: float,
            dropout: float, tinit: int, tfinal: int, deltaT: int, orth_reg_weight: float,
            total_step: int) -> tuple[nn.Module, PeftAdaLoRA]:
    """peft's AdaLoRA and the hook that runs its allocator inside pelib.train.train."""
    from peft import AdaLoraConfig, get_peft_model

    model = get_peft_model(model, AdaLoraConfig(
        task_type=_task_type(model), init_r=init_r, target_r=target_r, lora_alpha=alpha,
        lora_dropout=dropout, target_modules=targets, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
        orth_reg_weight=orth_reg_weight, total_step=total_step))
    return model, PeftAdaLoRA(model)


def prefix(model: nn.Module, prefix_length: int, hidden: int | None = None) -> nn.Module:
    """peft's prefix tuning with the MLP reparametrisation (refuses BERT under transformers 5:
    "Model does not support past key values")."""
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(
        task_type=_task_type(model), num_virtual_tokens=prefix_length, prefix_projection=True,
        encoder_hidden_size=hidden or model.config.hidden_size))
