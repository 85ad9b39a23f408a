"""pelib.kernels: Triton kernels for PEFT training, each beside its pure-torch reference.

    nf4            NF4 (+ double quantisation) dequantisation, bit-exact with bitsandbytes
    rmsnorm        RMSNorm forward and backward (dx and dW)
    swiglu         h = silu(g) * u, forward and backward
    rope           rotary position embedding on Q and K (HF rotate_half convention, GQA)
    cross_entropy  logsumexp cross-entropy, chunked over the vocabulary
    lora           fused LoRA linear y = x W^T + s (x A^T) B^T, W dense or NF4
    patch          swap these into a transformers Llama model, pelib's LoRA layers included (and back)
    bench          timings against torch eager and the bandwidth limit (`python -m pelib.kernels.bench`),
                   with bench_qlora: a QLoRA training step, patched vs not

Each public function dispatches (see _dispatch.py): the Triton kernel for CUDA tensors or in
the interpreter, the `_ref` otherwise, or whichever `with pelib.kernels.backend("ref"):` asks
for. The `_triton` / `_fused` variants in each file call the kernel directly.

Note: `pelib.kernels.swiglu` and `pelib.kernels.cross_entropy` name the functions; the modules
of the same names are imported as `from pelib.kernels.swiglu import ...`.

On a machine without CUDA the kernels run in Triton's interpreter. It reads TRITON_INTERPRET
when each `@triton.jit` decorator runs, so it is set here, before any kernel file is imported.
"""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from ._dispatch import backend, get_backend, set_backend, use_triton  # noqa: E402
from .nf4 import NF4Weight, nf4_dequantize, nf4_dequantize_ref  # noqa: E402
from .rmsnorm import RMSNormFunction, rms_norm, rms_norm_ref  # noqa: E402
from .swiglu import SwiGLUFunction, swiglu, swiglu_ref  # noqa: E402
from .rope import RoPEFunction, apply_rope, apply_rope_ref  # noqa: E402
from .cross_entropy import CrossEntropyFunction, cross_entropy, cross_entropy_ref  # noqa: E402
from .lora import LoRALinearFunction, lora_linear, lora_linear_ref  # noqa: E402
from .patch import causal_lm_loss, patch, unpatch  # noqa: E402
