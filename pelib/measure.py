"""How pelib's benchmarks measure: one timer, one peak-memory helper, and the two rates that
set the physical limit (copy bandwidth, matmul throughput). A leaf: torch (and psutil) only.

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

The limit (DESIGN.md: every benchmark prints ours, the peer's, and the limit) is
max(bytes / bandwidth, FLOPs / matmul rate): `copy_bandwidth` and `matmul_rate` measure the
two rates on this device, `count_flops` counts a function's FLOPs (torch's FlopCounterMode).
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

import torch


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
        return self.peak / 2**20

    @property
    def added_mb(self) -> float:
        """MiB above what was held on entry."""
        return (self.peak - self.base) / 2**20


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
