"""pelib.kernels: Triton kernels for PEFT training, each beside its pure-torch reference.

    nf4                   NF4 (+ double quantisation) dequantisation, bit-exact with bitsandbytes:
                          the GPU path of `pelib.quant.dequantize_4bit` (its reference lives there)
    rmsnorm               RMSNorm forward and backward (dx and dW)
    swiglu_kernel         h = silu(g) * u, forward and backward
    rope                  rotary position embedding on Q and K (HF rotate_half convention, GQA)
    cross_entropy_kernel  logsumexp cross-entropy, chunked over the vocabulary
    lora                  fused LoRA linear y = x W^T + s (x A^T) B^T, W dense or 4-bit

These are leaves: they import torch and triton only (lora.py reads a 4-bit W through the
dequantisers pelib.quant registers in kernels.lora.DEQUANTIZERS).
Swapping them into a transformers model is `pelib.patch`; their benchmark is
`python -m pelib bench kernels` (pelib/bench/kernels.py).

Each public function dispatches (see _dispatch.py): the Triton kernel for CUDA tensors or in
the interpreter, the `_ref` otherwise, or whichever `with pelib.kernels.backend("ref"):` asks
for. The `_triton` / `_fused` variants in each file call the kernel directly.

On a machine without CUDA the kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET
when each `@triton.jit` decorator runs, so the variable is set around the import of the kernel
files below and then put back: pelib's kernels are interpreted, the rest of the process (a
user's own Triton code) sees the environment it had. A value the user set is left alone.
"""
import os as _os

import torch as _torch

_SET_HERE = not _torch.cuda.is_available() and "TRITON_INTERPRET" not in _os.environ
if _SET_HERE:
    _os.environ["TRITON_INTERPRET"] = "1"
try:
    from ._dispatch import backend, get_backend, set_backend, use_triton
    from .cross_entropy_kernel import CrossEntropyFunction, cross_entropy, cross_entropy_ref
    from .lora import LoRALinearFunction, lora_linear, lora_linear_ref
    from .nf4 import dequantize_4bit_triton
    from .rmsnorm import RMSNormFunction, rms_norm, rms_norm_ref
    from .rope import RoPEFunction, apply_rope, apply_rope_ref
    from .swiglu_kernel import SwiGLUFunction, swiglu, swiglu_ref
    if _SET_HERE:
        from . import _dispatch, cross_entropy_kernel, nf4, rmsnorm, rope, swiglu_kernel

        _dispatch.interpret_with_stdlib([
            cross_entropy_kernel._ce_fwd_kernel, cross_entropy_kernel._ce_bwd_kernel,
            nf4._nf4_dequant_kernel, rmsnorm._rmsnorm_fwd_kernel, rmsnorm._rmsnorm_bwd_kernel,
            rope._rope_kernel, swiglu_kernel._swiglu_fwd_kernel, swiglu_kernel._swiglu_bwd_kernel])
finally:
    if _SET_HERE:
        del _os.environ["TRITON_INTERPRET"]
