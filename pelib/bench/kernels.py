"""Benchmarks of pelib's kernels: ours, the torch-eager peer, and the physical limit.

    python -m pelib bench kernels --out results/kernels            # CPU: torch paths timed only
    python -m pelib bench kernels --gpu --out $OUT                 # one H200: full sizes
    bench/gpu.sh $OUT                                              # the same, with a time limit

Every case is a forward+backward (or, for NF4 dequant, a forward) over realistic shapes; the
last is a whole QLoRA training step of a SmolLM2-shaped model with `patch` on vs off
(qlora_step.py; the goal: a speed-up of at least 1.5x). Each prints three numbers:
our time, the peer's time, and the limit, which is
max(bytes moved / bandwidth, FLOPs / matmul rate). The GPU limits use the H200's spec-sheet
figures (4.8 TB/s HBM3e, 989 TFLOP/s dense bf16; no run of this code has measured a GPU yet);
the measured copy rate of the current device is printed beside them. On the CPU the Triton
interpreter is a correctness tool, not a speed measurement: "ours" is run once, checked against
the peer, and not timed.
Times come from pelib.measure.time_ms (the implementations of a case in alternating turns, CUDA
events on a GPU); peak memory is what each implementation's first call adds (measure.PeakMemory).

Each case also reports max|ours - peer| / max|peer| on its first output, so a GPU run doubles as the first
check of the compiled kernels against torch on that device. Results go to OUT/results.json and
OUT/results.md. These are not tests: nothing here asserts a time.
"""
import json
import os

import torch

from ..files import writable_dir, write_text
from ..kernels.cross_entropy_kernel import cross_entropy_ref, cross_entropy_triton
from ..kernels.lora import lora_linear_fused, lora_linear_ref
from ..kernels.rmsnorm import rms_norm_ref, rms_norm_triton
from ..kernels.rope import apply_rope_ref, apply_rope_triton
from ..kernels.swiglu_kernel import swiglu_ref, swiglu_triton
from ..measure import copy_bandwidth, matmul_rate, peak_added_mb, time_ms
from ..quant import QuantState, dequantize_4bit, dequantize_4bit_ref, get_code
from .options import Parser
from .qlora_step import SMOLLM2, TINY, qlora_step_row

H200 = {"bandwidth": 4.8e12, "bf16_flops": 989e12}  # spec sheet (H200 SXM)
GPU_SIZES = dict(h=4096, m=14336, r=16, N=8192, V=49152, B=4, T=2048, Hq=32, Hk=8, D=128, qlora=SMOLLM2)
TINY_SIZES = dict(h=64, m=160, r=4, N=33, V=1003, B=1, T=33, Hq=9, Hk=3, D=64, qlora=TINY)
REPEATS = {"cuda": (5, 50), "cpu": (1, 3)}  # (warm-up, timed) calls per implementation


def _grad_fn(f, inputs, dy):
    """A closure that runs f() forward and backward to `inputs` (no .grad accumulation)."""
    def run():
        out = f()
        out = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(out, inputs, dy if isinstance(dy, tuple) else (dy,))
    return run


def _nf4_weight(shape, device, dtype):
    """An NF4+DQ weight as (packed, QuantState), and bitsandbytes' (packed, state) pair: quantised
    by bitsandbytes when importable (it is optional on a GPU), else random bytes and scales."""
    try:
        import bitsandbytes.functional as bnbF
        W = torch.randn(shape, device=device, dtype=dtype)
        packed, qs = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        return (packed, QuantState.from_bnb(qs)), (packed, qs)
    except Exception:
        n = shape[0] * shape[1]
        g = torch.Generator(device=device).manual_seed(0)
        nb = -(-n // 64)
        state = QuantState(
            shape=torch.Size(shape), dtype=dtype, blocksize=64, quant_type="nf4",
            code=get_code("nf4").to(device),
            qabsmax=torch.randint(0, 256, (nb,), dtype=torch.uint8, device=device, generator=g),
            absmax2=torch.rand(-(-nb // 256), device=device, generator=g) + 0.5,
            code2=torch.linspace(-1, 1, 256, device=device), offset=torch.tensor(0.1, device=device))
        packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, device=device, generator=g)
        return (packed, state), None


def _dequantize_triton(packed, state, dtype):
    """pelib.quant's one 4-bit op with the kernels backend set to Triton (the interpreter on a CPU)."""
    from ..kernels import backend

    with backend("triton"):
        return dequantize_4bit(packed, state, dtype)


def cases(sz, device, dtype):
    """name -> (impls {label: closure}, bytes, flops, check (ours, peer) closures)."""
    dev, gen = device, torch.Generator(device=device).manual_seed(0)
    def rnd(*s):
        return torch.randn(*s, device=dev, dtype=dtype, generator=gen)

    N, h, m, r, V, B = sz["N"], sz["h"], sz["m"], sz["r"], sz["V"], dtype.itemsize
    out = {}

    # NF4 + double quantisation dequant of a (m, h) weight
    w4, bnb_pair = _nf4_weight((m, h), dev, dtype)
    impls = {"ours": lambda: _dequantize_triton(*w4, dtype), "torch": lambda: dequantize_4bit_ref(*w4, dtype)}
    if bnb_pair is not None:
        import bitsandbytes.functional as bnbF
        impls["bitsandbytes"] = lambda: bnbF.dequantize_4bit(*bnb_pair)
    n = m * h
    out["nf4_dq_dequant"] = (impls, n // 2 + n // 64 + 4 * (n // 16384) + n * B, 3 * n)

    # RMSNorm forward + backward (dx, dw), rows of the hidden size
    x, w, dy = rnd(N, h).requires_grad_(), (1 + 0.1 * rnd(h)).requires_grad_(), rnd(N, h)
    out["rmsnorm_fwd_bwd"] = ({"ours": _grad_fn(lambda: rms_norm_triton(x, w), (x, w), dy),
                               "torch": _grad_fn(lambda: rms_norm_ref(x, w), (x, w), dy)},
                              5 * N * h * B, 12 * N * h)

    # SwiGLU forward + backward on the intermediate size
    g, u, dh = rnd(N, m).requires_grad_(), rnd(N, m).requires_grad_(), rnd(N, m)
    out["swiglu_fwd_bwd"] = ({"ours": _grad_fn(lambda: swiglu_triton(g, u), (g, u), dh),
                              "torch": _grad_fn(lambda: swiglu_ref(g, u), (g, u), dh)},
                             8 * N * m * B, 15 * N * m)

    # RoPE on Q and K forward + backward, (B, H, T, D) views as attention produces them
    Bq, T, Hq, Hk, D = sz["B"], sz["T"], sz["Hq"], sz["Hk"], sz["D"]
    q = rnd(Bq, T, Hq * D).view(Bq, T, Hq, D).transpose(1, 2).detach().requires_grad_()
    k = rnd(Bq, T, Hk * D).view(Bq, T, Hk, D).transpose(1, 2).detach().requires_grad_()
    ang = torch.arange(T, device=dev)[:, None] * 10000.0 ** (-torch.arange(0, D, 2, device=dev) / D)
    cos = torch.cat([ang.cos()] * 2, -1)[None].to(dtype)
    sin = torch.cat([ang.sin()] * 2, -1)[None].to(dtype)
    dq, dk = rnd(Bq, Hq, T, D), rnd(Bq, Hk, T, D)
    out["rope_qk_fwd_bwd"] = ({"ours": _grad_fn(lambda: apply_rope_triton(q, k, cos, sin), (q, k), (dq, dk)),
                               "torch": _grad_fn(lambda: apply_rope_ref(q, k, cos, sin), (q, k), (dq, dk))},
                              4 * Bq * T * (Hq + Hk) * D * B, 6 * Bq * T * (Hq + Hk) * D)

    # cross-entropy forward + backward over the vocabulary
    logits = rnd(N, V).requires_grad_()
    labels = torch.randint(0, V, (N,), device=dev, generator=gen)
    one = torch.ones((), device=dev)
    out["cross_entropy_fwd_bwd"] = (
        {"ours": _grad_fn(lambda: cross_entropy_triton(logits, labels), (logits,), one),
         "torch": _grad_fn(lambda: cross_entropy_ref(logits, labels), (logits,), one)},
                                    3 * N * V * B, 6 * N * V)

    # LoRA MLP forward + backward: gate/up (m, h), down (h, m), rank r, W in NF4 or dense.
    # bytes: the three NF4 weights read twice (n/2 each) + activations; FLOPs: per projection
    # 4*N*in*out (y, dx) + N*r*(8*in + 6*out) (LoRA terms, see lora.py)
    X, dY = rnd(N, h).requires_grad_(), rnd(N, h)
    Wg4, Wu4, Wd4 = w4, _nf4_weight((m, h), dev, dtype)[0], _nf4_weight((h, m), dev, dtype)[0]
    Wg, Wu, Wd = (dequantize_4bit_ref(*W, dtype) for W in (Wg4, Wu4, Wd4))
    lora = [(0.01 * rnd(r, i), 0.01 * rnd(o, r)) for o, i in ((m, h), (m, h), (h, m))]
    params = [t.requires_grad_() for ab in lora for t in ab]

    def mlp(lin, swi, Ws):
        (Ag, Bg), (Au, Bu), (Ad, Bd) = lora
        return lambda: lin(swi(lin(X, Ws[0], Ag, Bg, 2.0), lin(X, Ws[1], Au, Bu, 2.0)), Ws[2], Ad, Bd, 2.0)

    ins = (X, *params)
    out["lora_mlp_fwd_bwd"] = ({
        "ours_nf4": _grad_fn(mlp(lora_linear_fused, swiglu_triton, (Wg4, Wu4, Wd4)), ins, dY),
        "ours_dense": _grad_fn(mlp(lora_linear_fused, swiglu_triton, (Wg, Wu, Wd)), ins, dY),
        "torch_nf4": _grad_fn(mlp(lora_linear_ref, swiglu_ref, (Wg4, Wu4, Wd4)), ins, dY),
        "torch_dense": _grad_fn(mlp(lora_linear_ref, swiglu_ref, (Wg, Wu, Wd)), ins, dY)},
        3 * m * h + 6 * N * (h + m) * B, 12 * N * h * m + N * r * (22 * h + 20 * m))
    return out


def run(sizes, device, dtype, out_dir, peaks=None):
    os.makedirs(out_dir, exist_ok=True)
    copy_bw = copy_bandwidth(device)
    peaks = peaks or (H200 if device.type == "cuda" else  # this CPU's own measured rates
                      {"bandwidth": copy_bw, "bf16_flops": matmul_rate(device, torch.bfloat16, n=512)})
    rows = []
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "versions": _versions(),
              "dtype": str(dtype), "sizes": sizes, "peaks": peaks, "measured_copy_Bps": copy_bw, "rows": rows}
    for name, (impls, nbytes, flops) in cases(sizes, device, dtype).items():
        limit_ms = 1e3 * max(nbytes / peaks["bandwidth"], flops / peaks["bf16_flops"])
        outs, peak = {}, {}
        for k, f in impls.items():                          # first calls: outputs and peak memory
            outs[k], peak[k] = peak_added_mb(f, device)
        def first(o):
            return (o if torch.is_tensor(o) else o[0]).float()

        ours_key = next(k for k in impls if k.startswith("ours"))
        peer_key = next(k for k in impls if k.startswith("torch"))
        a, b = first(outs[ours_key]), first(outs[peer_key])
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # relative to the peer's scale
        row = {"case": name, "bytes": nbytes, "flops": flops, "limit_ms": limit_ms, "rel_diff": err}
        # on the CPU "ours" only interprets: checked above, not timed
        timed = {k: f for k, f in impls.items() if device.type == "cuda" or not k.startswith("ours")}
        warmup, repeats = REPEATS[device.type]
        ms_all = time_ms(timed, repeats, warmup, device)
        for k in impls:
            ms = ms_all.get(k)
            row[k + "_ms"] = ms
            row[k + "_GBps"] = None if ms is None else nbytes / (ms * 1e-3) / 1e9
            row[k + "_peak_MB"] = peak[k]
        rows.append(row)
        print(_fmt(row), flush=True)
        _write(result, out_dir)                             # after every row: a later failure keeps these
    del impls, outs, a, b
    if "qlora" in sizes:                                    # a whole training step, kernels on vs off
        rows.append(qlora_step_row(sizes["qlora"], device, dtype, peaks))
        print(_fmt(rows[-1]), flush=True)
        _write(result, out_dir)
    return result


def _write(result, out_dir):
    peaks, copy_bw = result["peaks"], result["measured_copy_Bps"]
    md = (f"# pelib bench kernels on {result['device']} ({result['dtype']})\n\n"
          f"sizes {result['sizes']}\n\n"
          f"versions {result['versions']}\n\n"
          f"limits at {peaks['bandwidth'] / 1e9:.0f} GB/s and "
          f"{peaks['bf16_flops'] / 1e12:.1f} TFLOP/s; "
          f"measured copy here {copy_bw / 1e9:.0f} GB/s\n\n"
          + "\n".join(_fmt(r) for r in result["rows"]) + "\n")
    write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1))
    write_text(os.path.join(out_dir, "results.md"), md)


def _versions():
    import triton
    v = {"torch": torch.__version__, "triton": triton.__version__}
    try:
        import bitsandbytes
        v["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        v["bitsandbytes"] = None
    return v


def _fmt(row):
    times = "  ".join(f"{k[:-3]} {'interp' if v is None else f'{v:.3f}'} ms"
                      for k, v in row.items() if k.endswith("_ms") and k != "limit_ms")
    speedup = f" | speed-up {row['speedup']:.2f}x (goal 1.5x)" if row.get("speedup") else ""
    return (f"{row['case']:<24} {times}  | limit {row['limit_ms']:.3f} ms | "
            f"max|ours-torch|/max|torch| {row['rel_diff']:.2g}{speedup}")


def main(argv: list[str] | None = None):
    p = Parser(prog="pelib bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="full sizes on cuda:0 (bf16)")
    p.add_argument("--out", default="results/kernels", help="folder for results.json and results.md")
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs a CUDA device and torch sees none; run without --gpu for the CPU sizes")
    try:
        writable_dir(args.out, "--out")
    except ValueError as e:
        p.error(str(e))
    if args.gpu:
        return run(GPU_SIZES, torch.device("cuda"), torch.bfloat16, args.out)
    return run(TINY_SIZES, torch.device("cpu"), torch.float32, args.out)

