"""pelib.kernels: Triton kernels for PEFT training, each beside its pure-torch reference.

    nf4                   NF4 (+ double quantisation) dequantisation, bit-exact with bitsandbytes:
                          the GPU path of `pelib.quant.dequantize_4bit` (its reference lives there)
    rmsnorm               RMSNorm forward and backward (dx and dW)
    swiglu_kernel         h = silu(g) * u, forward and backward
    rope                  rotary position embedding on Q and K (HF rotate_half convention, GQA)
    cross_entropy_kernel  logsumexp cross-entropy, chunked over the vocabulary
    lora                  fused LoRA linear y = x W^T + s (x A^T) B^T, W dense or 4-bit

These are leaves: they import torch and triton only (lora.py reaches pelib.quant's op lazily).
Swapping them into a transformers model is `pelib.patch`; their benchmark is
`python -m pelib bench kernels` (pelib/bench/kernels.py).

Each public function dispatches (see _dispatch.py): the Triton kernel for CUDA tensors or in
the interpreter, the `_ref` otherwise, or whichever `with pelib.kernels.backend("ref"):` asks
for. The `_triton` / `_fused` variants in each file call the kernel directly.

On a machine without CUDA the kernels run in Triton's interpreter. It reads TRITON_INTERPRET
when each `@triton.jit` decorator runs, so it is set here, before any kernel file is imported.
"""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from ._dispatch import backend, get_backend, set_backend, use_triton  # noqa: E402
from .cross_entropy_kernel import CrossEntropyFunction, cross_entropy, cross_entropy_ref  # noqa: E402
from .lora import LoRALinearFunction, lora_linear, lora_linear_ref  # noqa: E402
from .nf4 import dequantize_4bit_triton  # noqa: E402
from .rmsnorm import RMSNormFunction, rms_norm, rms_norm_ref  # noqa: E402
from .rope import RoPEFunction, apply_rope, apply_rope_ref  # noqa: E402
from .swiglu_kernel import SwiGLUFunction, swiglu, swiglu_ref  # noqa: E402
