"""Benchmark: 4-bit dequantisation on the CPU, pelib against bitsandbytes and the memory floor
(QLoRA, arXiv:2305.14314: W~ = code[q] * absmax, absmax = code2[q2] * absmax2 + offset).

    python -m pelib bench quant --n 4096 [--dtype float32] [--threads 1] [--tokens 256]

Both libraries dequantise the same bytes and scales (bitsandbytes' NF4 of an N(0, 1) weight,
blocksize 64, double quantisation)
in the same process, alternating runs (pelib.measure.time_ms) so that both see the same machine
load; we print the medians, the peak memory each call adds, their ratio, pelib writing into a
preallocated `out`, and two floors:
  - traffic: bytes that must move (n/2 packed bytes in, n * itemsize out, scales) divided
    by the bandwidth of a large tensor copy measured here;
    pelib writing into `out` is also given as a share of that bandwidth (traffic / time);
  - a fresh output: allocating and first touching an n-element buffer. The OS maps and
    zeroes every new page, and both libraries return a new tensor each call, so this cost
    is in both timings.
Then the use that matters, a frozen 4-bit layer's forward + backward (to dx) on `--tokens`
rows: pelib's Linear4bit (W~ into a reused workspace) against bitsandbytes.nn.Linear4bit
holding the same bytes, and the plain fp32 nn.Linear (its matmuls are the floor).
A benchmark, not a test: timings on a shared machine are noisy.
"""
import logging

import torch

from ..measure import copy_bandwidth, peak_added_mb, time_ms
from ..quant.blockwise import QuantState, dequantize_4bit
from .options import Parser, int_at_least, positive_int, thread_count


def bench_dequant(n: int = 4096, repeats: int = 9, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Time pelib vs bitsandbytes dequantize_4bit of an (n, n) weight; print and return the figures."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU import logs a warning
    import bitsandbytes.functional as bnbF

    torch.manual_seed(seed)
    W = torch.randn(n, n).to(dtype)
    bnb_packed, bnb_state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    # Both dequantise the same bytes and scales: bitsandbytes', held in our QuantState.
    packed = bnb_packed.reshape(-1)
    state = QuantState.from_bnb(bnb_state)

    # Warm up, then alternate so each sees the same load. Both return a new tensor (what a
    # caller sees); pelib is also timed writing into a preallocated `out` (bitsandbytes has
    # no out= kernel on the CPU), which leaves out the cost of fresh pages.
    out = torch.empty_like(W)
    runs = {
        "pelib": lambda: dequantize_4bit(packed, state),
        "bnb": lambda: bnbF.dequantize_4bit(bnb_packed, bnb_state),
        "pelib_out": lambda: dequantize_4bit(packed, state, out=out),
    }
    ms = time_ms(runs, repeats)
    assert torch.equal(out, bnbF.dequantize_4bit(bnb_packed, bnb_state))
    peak = {k: peak_added_mb(runs[k])[1] for k in ("pelib", "bnb")}

    # Floors. Copy bandwidth on touched fp32 buffers of the output's size: read + write.
    numel, itemsize = n * n, torch.empty((), dtype=dtype).element_size()
    bandwidth = copy_bandwidth("cpu", max(numel * itemsize // 4, 1))  # bytes/s
    scales = sum(t.numel() * t.element_size() for t in state.tensors().values())
    traffic = numel // 2 + numel * itemsize + scales
    ms_floor = 1e3 * traffic / bandwidth
    ms_fresh = time_ms({"fresh": lambda: torch.empty(numel, dtype=dtype).fill_(0)}, repeats)["fresh"]

    res = dict(n=n, dtype=str(dtype), threads=torch.get_num_threads(),
               **{f"{k}_ms": v for k, v in ms.items()},
               ratio=ms["pelib"] / ms["bnb"],
               traffic_MB=traffic / 1e6, copy_GBps=bandwidth / 1e9, floor_ms=ms_floor,
               # the achieved rate as a share of the copy's: traffic / time over traffic / floor
               bandwidth_share=ms_floor / ms["pelib_out"],
               fresh_output_ms=ms_fresh,
               pelib_peak_MB=peak["pelib"], bnb_peak_MB=peak["bnb"])
    print(f"dequantize_4bit NF4+DQ, {n}x{n} -> {dtype}, {res['threads']} threads, median of {repeats}")
    print(f"  pelib          {ms['pelib']:8.2f} ms  (peak added {peak['pelib']:.0f} MiB)")
    print(f"  bitsandbytes   {ms['bnb']:8.2f} ms  (peak added {peak['bnb']:.0f} MiB)")
    print(f"  ratio          {res['ratio']:8.2f}     (pelib / bitsandbytes)")
    print(f"  pelib, out=    {ms['pelib_out']:8.2f} ms  (into a preallocated output: "
          f"{traffic / ms['pelib_out'] / 1e6:.1f} GB/s, {res['bandwidth_share']:.0%} of the copy bandwidth)")
    print(f"  traffic floor  {ms_floor:8.2f} ms  ({traffic / 1e6:.1f} MB at "
          f"{bandwidth / 1e9:.1f} GB/s copy bandwidth)")
    print(f"  fresh output   {ms_fresh:8.2f} ms  (allocate + first touch of a new output: "
          "in both first rows)")
    return res


def bench_linear(n: int = 4096, tokens: int = 256, repeats: int = 9, seed: int = 0) -> dict:
    """Forward + backward of an (n, n) frozen 4-bit layer: pelib vs bitsandbytes vs nn.Linear."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb
    import torch.nn as nn

    from ..quant.linear4bit import Linear4bit

    torch.manual_seed(seed)
    dense = nn.Linear(n, n).requires_grad_(False)
    theirs = bnb.nn.Linear4bit(n, n, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    theirs.load_state_dict(dense.state_dict())
    theirs = theirs.to("cpu").requires_grad_(False)  # .to() quantises
    ours = Linear4bit.from_linear(dense)  # same algorithm: same bytes (checked below)
    x = torch.randn(tokens, n, requires_grad=True)

    def step(layer):
        return lambda: layer(x).sum().backward()

    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x)), "pelib and bitsandbytes disagree on this layer"
    runs = {"pelib": step(ours), "bnb": step(theirs), "fp32 nn.Linear": step(dense)}
    ms = time_ms(runs, repeats)
    res = dict(n=n, tokens=tokens, threads=torch.get_num_threads(), **{f"{k}_ms": v for k, v in ms.items()},
               ratio=ms["pelib"] / ms["bnb"])
    print(f"frozen 4-bit layer {n}x{n}, forward + backward to dx, {tokens} tokens, "
          f"{res['threads']} threads, median of {repeats}")
    print(f"  pelib Linear4bit  {ms['pelib']:8.2f} ms")
    print(f"  bnb Linear4bit    {ms['bnb']:8.2f} ms")
    print(f"  ratio             {res['ratio']:8.2f}     (pelib / bitsandbytes)")
    print(f"  fp32 nn.Linear    {ms['fp32 nn.Linear']:8.2f} ms  "
          "(the same two matmuls, no dequantisation: the floor)")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="pelib bench quant", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int_at_least(64, "the weight is n x n, in blocks of 64"), default=4096)
    ap.add_argument("--repeats", type=positive_int, default=9)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--tokens", type=int_at_least(1, "rows of x", high=16384), default=256,
                    help="rows of x for the layer benchmark")
    ap.add_argument("--threads", type=thread_count, default=None,
                    help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_dequant(args.n, args.repeats, getattr(torch, args.dtype))
    bench_linear(args.n, args.tokens, args.repeats)

