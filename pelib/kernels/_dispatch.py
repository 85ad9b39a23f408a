"""Which implementation runs: the Triton kernel or the pure-torch reference.

Every kernel file in `pelib.kernels` has two paths with one signature, `<name>` (Triton) and
`<name>_ref` (torch). The public function asks `use_triton(t)` which one to take:

    backend "auto"   Triton when `t` is on a CUDA device, or when it is on the CPU and the
                     Triton interpreter is on (TRITON_INTERPRET=1); the reference otherwise.
    backend "triton" always Triton (fails on a CPU tensor without the interpreter).
    backend "ref"    always the reference.

The switch is process-wide and is meant for tests, benchmarks and the notebook:

    with pelib.kernels.backend("ref"):
        y = pelib.kernels.rms_norm(x, w)      # the torch reference, whatever the device
"""
import contextlib
import functools
import os

import torch

_BACKENDS = ("auto", "triton", "ref")


def _backend_from_env() -> str:
    name = os.environ.get("PELIB_KERNELS", "auto")
    if name not in _BACKENDS:
        raise ValueError(f"PELIB_KERNELS={name!r} is not a kernels backend; set it to one of "
                         f"{', '.join(_BACKENDS)}, or unset it")
    return name


_state = {"backend": _backend_from_env()}


# Read once, while pelib.kernels imports its kernel files (the variable may be set only then).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when pelib's kernels were defined for Triton's numpy interpreter."""
    return _INTERPRETING


def interpret_with_stdlib(kernels) -> None:
    """Let pelib's interpreted `kernels` call Triton's standard library (tl.sum, tl.max, tl.zeros).

    Those are `@triton.jit` functions defined when `triton` was imported. If that happened before
    TRITON_INTERPRET was set (pelib sets it only while its own kernel files are imported), they
    are compiled-mode functions that the interpreter cannot call. While one of `kernels` runs,
    interpreter twins stand in for them and are put back after, so the rest of the process keeps
    Triton as it was.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    twins = [(mod, name, f, InterpretedFunction(f.fn)) for mod in (tl, tl.standard, tl.math)
             for name, f in list(vars(mod).items()) if isinstance(f, JITFunction)]
    if not twins:  # triton was imported with the interpreter on: nothing to stand in
        return
    try:  # imported lazily by a launch; it checks the library it wraps, so import it before the swap
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass

    def wrap(run):
        @functools.wraps(run)
        def run_with_stdlib(*args, **kwargs):
            for mod, name, _, twin in twins:
                setattr(mod, name, twin)
            try:
                return run(*args, **kwargs)
            finally:
                for mod, name, f, _ in twins:
                    setattr(mod, name, f)
        return run_with_stdlib

    for k in kernels:
        k.run = wrap(k.run)


def get_backend() -> str:
    return _state["backend"]


def set_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _state["backend"] = name


@contextlib.contextmanager
def backend(name: str):
    """Temporarily select "auto", "triton" or "ref"."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def use_triton(t: torch.Tensor) -> bool:
    b = get_backend()
    if b == "ref":
        return False
    if b == "triton":
        return True
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def launch_options() -> dict:
    """Extra keyword arguments for a kernel launch.

    On a GPU, LLVM fuses `a * b + c` into one FMA (one rounding instead of two). Kernels that
    promise bit-exact results against a library that rounds twice pass these options; the
    interpreter (numpy) never fuses and takes no compiler options.
    """
    return {} if interpreting() else {"enable_fp_fusion": False}


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, cap_interpreter: int = 4) -> int:
    """How many programs a persistent (grid-stride) kernel launches.

    GPU: a few per SM keeps every SM busy. Interpreter: each program instance costs about
    3 ms of Python, so a handful of large ones is fastest.
    """
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return cap_interpreter
