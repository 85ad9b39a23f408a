"""Whether a tensor's op takes pelib's Triton kernel or its torch path, decided without importing
Triton (pelib.kernels imports it; a CPU run that never uses a kernel need not load it).

The kernel runs for a CUDA tensor unless the kernels backend is "ref", and anywhere when the
backend is "triton" (on the CPU: Triton's interpreter, a correctness tool). The backend is
pelib.kernels' switch once that is loaded, else the PELIB_KERNELS variable (default "auto").
"""
from __future__ import annotations

import os
import sys

import torch


def triton_wanted(t: torch.Tensor) -> bool:
    d = sys.modules.get("pelib.kernels._dispatch")  # loaded only if someone uses the kernels
    backend = d.get_backend() if d else os.environ.get("PELIB_KERNELS", "auto")
    if backend not in ("auto", "triton", "ref"):  # as pelib.kernels refuses it
        raise ValueError(f"PELIB_KERNELS={backend!r} is not a kernels backend; set it to one of "
                         "auto, triton, ref, or unset it")
    return backend == "triton" or (t.is_cuda and backend != "ref")
