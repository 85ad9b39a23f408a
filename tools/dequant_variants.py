"""Ways to run NF4 + DQ dequantisation on a CPU, timed against the copy bandwidth (results page,
"NF4 dequantisation on the CPU"):

    python tools/dequant_variants.py [--n 4096] [--repeats 9]

Every variant writes W~ of an n x n weight into the same preallocated fp32 output and is checked
bit-equal to `dequantize_4bit_ref`; times are medians of alternating runs (pelib.measure.time_ms).
The share of the copy bandwidth is traffic / time over the copy's rate, traffic being the n/2
packed bytes read and the 4 n bytes written. Variants:
  - pelib's `dequantize_4bit` (a 256-entry byte -> two values table, one gather and one scale per
    chunk of bytes) at its default chunk and at three others;
  - the same gather and scale, with chunks below torch's parallel grain (each op serial) shared
    between two Python threads, one per core: "threading by blocks";
  - `torch.compile` (inductor's generated C++) of the plain reference: unpack, look up, scale.
A benchmark, not a test: run it on an idle machine.
"""
import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from pelib.measure import copy_bandwidth, time_ms
from pelib.quant.blockwise import _BYTE_NIBBLES, dequantize_4bit, dequantize_4bit_ref, quantize_4bit


def threaded_by_blocks(packed, absmax, code, out, chunk, pool):
    """Two threads, each over half the bytes, in chunks small enough that every op runs serially."""
    lut = code[_BYTE_NIBBLES].reshape(-1).view(torch.int64)  # (256,): two fp32 a byte
    flat, pairs = packed.reshape(-1), out.view(-1).view(torch.int64)

    def part(lo, hi):
        idx = torch.empty(chunk, dtype=torch.int32)
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            i = idx[: c1 - c0]
            i.copy_(flat[c0:c1])  # uint8 -> int32
            torch.index_select(lut, 0, i, out=pairs[c0:c1])
            pairs[c0:c1].view(torch.float32).view(-1, 64).mul_(absmax[2 * c0 // 64 : 2 * c1 // 64, None])

    half = flat.numel() // 2 // 32 * 32  # whole blocks of 64 weights (32 bytes) per thread
    list(pool.map(lambda bounds: part(*bounds), [(0, half), (half, flat.numel())]))


def reference_into(packed, absmax, code, out):
    q = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1, 64).long()  # (n_blocks, 64)
    out.view(-1, 64).copy_(code[q] * absmax[:, None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="the weight is n x n (n a multiple of 64)")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    n = args.n
    if n <= 0 or n % 64:
        ap.error(f"--n must be a positive multiple of 64, got {n}")
    torch.manual_seed(0)
    packed, state = quantize_4bit(torch.randn(n, n), 64, "nf4", True)
    want, out = dequantize_4bit_ref(packed, state), torch.empty(n, n)
    absmax, code, flat = state.block_absmax(), state.code, packed.reshape(-1)
    pool = ThreadPoolExecutor(2)

    runs = {"pelib, default chunk": lambda: dequantize_4bit(packed, state, out=out)}
    for kib in (64, 256, 1024):
        runs[f"pelib, {kib} KiB chunks"] = \
            lambda b=kib << 10: dequantize_4bit(packed, state, out=out, chunk_bytes=b)
    for kib in (8, 16):
        runs[f"2 threads, {kib} KiB serial chunks"] = \
            lambda b=kib << 10: threaded_by_blocks(packed, absmax, code, out, b, pool)
    with tempfile.TemporaryDirectory() as cache:  # inductor's generated code lives only as long as this
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        compiled = torch.compile(reference_into, dynamic=False)
        compiled(flat, absmax, code, out)
        compile_s = time.perf_counter() - t0
        runs["torch.compile(reference)"] = lambda: compiled(flat, absmax, code, out)
        measure(runs, want, out, n, args.repeats, compile_s)


def measure(runs, want, out, n, repeats, compile_s) -> None:
    """Check every variant's bits, then time them against the copy and print one line each."""
    for name, run in runs.items():  # every variant gives the reference's bits
        out.zero_()
        run()
        assert torch.equal(out, want), name
    ms = time_ms(runs, repeats)
    bandwidth = copy_bandwidth("cpu", n * n)
    traffic = n * n // 2 + 4 * n * n
    print(f"{n} x {n} NF4 + DQ -> fp32, {torch.get_num_threads()} threads, copy {bandwidth / 1e9:.1f} GB/s, "
          f"floor {1e3 * traffic / bandwidth:.2f} ms, torch.compile took {compile_s:.0f} s")
    for name, t in ms.items():
        print(f"  {name:34s} {t:8.2f} ms  {traffic / (t / 1e3) / bandwidth:4.0%} of the copy bandwidth")


if __name__ == "__main__":
    main()
