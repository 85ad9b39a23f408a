"""How pelib measures: one timer, one peak-memory helper, the two rates that
set the physical limit (copy bandwidth, matmul throughput), and the memory ledger of a training
step counted from its tensors. A leaf: torch (and psutil) only.

Timer. Runs being compared are timed in turns, not one after the other: on a shared machine
the load drifts, and turns make every run see the same drift. Each run is warmed up first
(allocator, caches, Triton's compiler), the order of a turn alternates (ABAB... then BABA...)
so no run always goes first, and the median of the repeats is reported (a robust centre: one
descheduled repeat moves a mean, not a median).
    CPU   wall clock (perf_counter) around one call;
    CUDA  a pair of CUDA events around one call, synchronised after it (kernel time as the
          device sees it, not the launch time the host sees).

Peak memory. `PeakMemory(device)` as a context manager: CUDA's max_memory_allocated (reset on
entry), or on the CPU the resident set size of this process sampled every 20 ms (glibc keeps
freed memory, so RSS is a loose upper bound). `.base` is the figure on entry, so
`.peak - .base` is what the block added.

The limit (every benchmark prints ours, the peer's, and the limit) is
max(bytes / bandwidth, FLOPs / matmul rate): `copy_bandwidth` and `matmul_rate` measure the
two rates on this device, `count_flops` counts a function's FLOPs (torch's FlopCounterMode).

Ledger. `memory_ledger(model, batch)` runs one real training step and counts, storage by
storage, the bytes of frozen weights, trainable parameters, gradients, optimizer state and the
activations autograd saves for backward (RSS and max_memory_allocated give one total; this says
what it is made of). Unlike RSS it excludes the allocator's caches and transient buffers.
`weights_ledger(model)` is the same count for a model that only runs forward (no step).
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

import torch

MiB = 2**20  # every memory figure of pelib is in MiB


def _once_ms(fn: Callable, cuda: bool) -> float:
    if cuda:
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        fn()
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def time_ms(runs: dict[str, Callable], repeats: int = 9, warmup: int = 1,
            device: torch.device | str = "cpu") -> dict[str, float]:
    """The median milliseconds of each zero-argument callable in `runs`, timed in alternating turns."""
    cuda = torch.device(device).type == "cuda"
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    names = list(runs)
    times = {k: [] for k in names}
    for i in range(repeats):
        for k in (names if i % 2 == 0 else names[::-1]):
            times[k].append(_once_ms(runs[k], cuda))
    return {k: statistics.median(v) for k, v in times.items()}


class PeakMemory:
    """Peak memory while the block runs: max_memory_allocated on CUDA, else the peak resident
    set size of this process, sampled every 20 ms (ru_maxrss would be the lifetime peak)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = self.base = 0
        self.kind = "cuda max_memory_allocated" if self.cuda else "process RSS (sampled)"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.peak = self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.peak = self.base = self._proc.memory_info().rss

        def sample():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)  # a block shorter than 20 ms

    @property
    def mb(self) -> float:
        return self.peak / MiB

    @property
    def added_mb(self) -> float:
        """MiB above what was held on entry."""
        return (self.peak - self.base) / MiB


def peak_added_mb(fn: Callable, device: torch.device | str = "cpu"):
    """Run fn() once under PeakMemory; (its result, MiB it added at its peak)."""
    with PeakMemory(device) as mem:
        out = fn()
    return out, mem.added_mb


def copy_bandwidth(device: torch.device | str = "cpu", numel: int | None = None) -> float:
    """Bytes/s of a large fp32 copy on `device` (read + write): the achievable bandwidth."""
    device = torch.device(device)
    numel = numel or (2**26 if device.type == "cuda" else 2**22)
    src, dst = torch.randn(numel, device=device), torch.zeros(numel, device=device)
    ms = time_ms({"copy": lambda: dst.copy_(src)}, repeats=9, device=device)["copy"]
    return 2 * numel * 4 / (ms * 1e-3)


def matmul_rate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                n: int = 1024) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in `dtype` on `device`: the achievable compute rate."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms({"mm": lambda: a @ b}, repeats=5, device=device)["mm"]
    return 2 * n**3 / (ms * 1e-3)


def count_flops(fn: Callable) -> int:
    """FLOPs of fn() as torch's FlopCounterMode counts them (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -- the memory ledger: what training holds, by kind, counted from real tensors --------------
LEDGER_KINDS = ("frozen weights", "trainable (adapter + head)", "gradients", "optimizer state",
                "activations saved for backward")


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the whole storage under `t`: views and tied tensors share one."""
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _tensors(obj):
    """The tensors in a value, a tuple/list or a dict of them (one level: a checkpoint's args)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


def weights_ledger(model: torch.nn.Module) -> dict[str, int]:
    """The ledger of a model that does not train (a zero-shot row): its weights and buffers, all
    frozen, and none of a training step's other kinds."""
    tensors = list(model.parameters()) + list(model.buffers())
    return {LEDGER_KINDS[0]: sum(dict(_storage(t) for t in tensors).values()),
            **{k: 0 for k in LEDGER_KINDS[1:]}}


def memory_ledger(model: torch.nn.Module, batch: dict, optimizer_factory: Callable = _adamw,
                  checkpointing: bool = False, loss_fn: Callable | None = None) -> dict[str, int]:
    """Bytes a training step holds, by kind (LEDGER_KINDS), counted from the tensors themselves
    during one real step: forward, backward, optimizer step. Each storage counts once.

        frozen weights      non-trainable parameters and every buffer (for pelib's Linear4bit:
                            the packed 4-bit bytes, the double-quantised scales, the code tables)
        trainable           parameters with requires_grad (adapter and head)
        gradients           their .grad after backward
        optimizer state     every tensor in optimizer.state after one step (AdamW: exp_avg,
                            exp_avg_sq and a 4-byte `step` per parameter tensor)
        activations         what autograd saves for backward during the forward (a
                            saved_tensors_hooks pack hook sees each one), minus the model's own
                            weights; with checkpointing also the inputs each checkpointed layer
                            keeps for its recomputation (the saves inside it are not kept)

    `batch` is the model's keyword input (input_ids, attention_mask and, for a loss, labels;
    without labels the sum of the logits is back-propagated). `loss_fn(model, batch)`, when
    given, is the step's loss instead of the model's own (an instruction-tuning run's answer-only
    loss, pelib.sft.sft_loss, which reads the batch itself). `checkpointing=True` measures
    with transformers' non-reentrant activation checkpointing on. The model is left as found:
    its weights, gradients, train/eval mode, checkpointing flags and torch's RNG state.
    """
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("batch must be a dict of the model's inputs with 'input_ids' (e.g. "
                         "tokenizer(texts, return_tensors='pt', padding=True) as a dict)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters, so training it holds no gradients "
                         "or optimizer state: inject an adapter first (pelib.apply_lora, "
                         "pelib.quant.apply_qlora, ...) or unfreeze the head "
                         "(pelib.inject.train_heads_only)")
    if checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support transformers' gradient "
                         "checkpointing; measure it with checkpointing=False")

    def total(tensors) -> int:
        return sum(dict(_storage(t) for t in tensors).values())

    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    weights = {_storage(t)[0] for t in frozen + trainable}  # saved weights are not activations
    ledger = {LEDGER_KINDS[0]: total(frozen), LEDGER_KINDS[1]: total(trainable)}

    # what this function changes, to put back afterwards
    before = dict(training=model.training, rng=torch.get_rng_state(),
                  data=[p.detach().clone() for p in trainable], grads=[p.grad for p in trainable],
                  flags={m: (m.__dict__.get("gradient_checkpointing", None),
                             m.__dict__.get("_gradient_checkpointing_func", None))
                         for m in model.modules() if hasattr(m, "gradient_checkpointing")},
                  # transformers' enable also hooks the input embeddings (enable_input_require_grads)
                  hooks={k: model.__dict__[k] for k in ("_require_grads_hooks", "_require_grads_hook")
                         if k in model.__dict__},
                  use_cache=getattr(getattr(model, "config", None), "use_cache", None))
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        ptr, nbytes = _storage(t)
        if ptr not in weights:
            saved[ptr] = nbytes

    def pack(t):
        keep(t)
        return t

    try:
        if checkpointing:
            if before["use_cache"]:  # a training step writes no KV cache; transformers warns if asked
                model.config.use_cache = False
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers before 5
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for m in before["flags"]:  # a checkpointed layer keeps its inputs until backward
                fn = m.__dict__.get("_gradient_checkpointing_func")
                if fn is not None and m.gradient_checkpointing:
                    def recording(function, *args, _fn=fn, **kwargs):
                        for t in _tensors([args, getattr(function, "keywords", {}), kwargs]):
                            keep(t)
                        return _fn(function, *args, **kwargs)
                    m._gradient_checkpointing_func = recording
        model.train()
        for p in trainable:
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch) if loss_fn is None else loss_fn(model, batch)
        if loss_fn is not None:  # the loss itself
            loss = out
        elif getattr(out, "loss", None) is not None:
            loss = out.loss
        else:
            loss = out.logits.float().sum()
        ledger[LEDGER_KINDS[4]] = sum(saved.values())
        loss.backward()
        del out, loss
        ledger[LEDGER_KINDS[2]] = total(p.grad for p in trainable if p.grad is not None)
        optimizer = optimizer_factory(trainable)
        optimizer.step()
        ledger[LEDGER_KINDS[3]] = total(t for state in optimizer.state.values()
                                        for t in _tensors(state))
        del optimizer
        return {k: ledger[k] for k in LEDGER_KINDS}
    finally:
        if before["use_cache"] is not None:
            model.config.use_cache = before["use_cache"]
        with torch.no_grad():
            for p, d, g in zip(trainable, before["data"], before["grads"]):
                p.copy_(d)
                p.grad = g
        for m, (flag, fn) in before["flags"].items():
            for name, value in (("gradient_checkpointing", flag), ("_gradient_checkpointing_func", fn)):
                if value is None:
                    m.__dict__.pop(name, None)  # back to the class attribute
                else:
                    setattr(m, name, value)
        old = {id(h) for h in before["hooks"].get("_require_grads_hooks", [])}
        for h in model.__dict__.get("_require_grads_hooks", None) or []:
            if id(h) not in old:
                h.remove()
        for k in ("_require_grads_hooks", "_require_grads_hook"):
            if k in before["hooks"]:
                setattr(model, k, before["hooks"][k])
            else:
                model.__dict__.pop(k, None)
        model.train(before["training"])
        torch.set_rng_state(before["rng"])


def cpu_has_fast_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX-512 BF16 or AMX)? On AVX2 alone bf16
    matmuls are converted to fp32 and run slower than fp32 (docs/benchmarks.md)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: may vanish
    return any(getattr(torch.cpu, f, lambda: False)() for f in probes)
