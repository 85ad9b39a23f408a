import os

# Triton kernels run in the interpreter on a CPU; the variable is read when @triton.jit runs,
# so it must be set before any kernel module is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PELIB_FAST", "1")
