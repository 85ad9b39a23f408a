"""Importing pelib changes nothing outside pelib; the command line sets its process's modes.

Each check runs in a fresh interpreter whose environment has no Hugging Face, tokenizers or
Triton variables (this test process has them: conftest sets them for the tests).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # subprocesses

ROOT = Path(__file__).resolve().parent.parent
VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM",
        "TRITON_INTERPRET")


def run_clean(code, tmp_path):
    """Run `code` as a script file (Triton wants @jit functions in a file) in a clean environment."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k not in VARS and k != "PELIB_KERNELS"}
    r = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow  # a subprocess, kernels in the interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is scoped only without CUDA")
def test_import_sets_no_variable_and_the_kernels_still_run_on_cpu(tmp_path):
    out = run_clean("""
        import os, torch, triton
        import pelib, pelib.kernels as K
        from pelib.quant import dequantize_4bit, quantize_4bit
        from pelib.quant.blockwise import dequantize_4bit_ref
        from triton.runtime.interpreter import InterpretedFunction
        left = [k for k in %r if k in os.environ]
        print("left", left)
        # pelib's kernels were defined for the interpreter; a kernel the user defines now is not
        print("ours", type(K.rmsnorm._rmsnorm_fwd_kernel).__name__)
        def user_kernel(x):
            pass
        print("user", isinstance(triton.jit(user_kernel), InterpretedFunction))
        torch.manual_seed(0)
        def close(a, b):
            return torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        x, w = torch.randn(5, 32), torch.randn(32)
        q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
        ang = torch.randn(2, 6, 8).repeat(1, 1, 2)       # (B, T, D): both halves the same, as HF
        cos, sin = ang.cos(), ang.sin()
        g, u = torch.randn(7, 33), torch.randn(7, 33)
        logits, labels = torch.randn(6, 11), torch.tensor([0, 3, 1, 2, 10, -100])
        A, B, W = torch.randn(4, 32), torch.randn(8, 4), torch.randn(8, 32)
        packed, state = quantize_4bit(torch.randn(64, 32))
        with K.backend("triton"):   # the kernels themselves, not the references
            ok = dict(
                rms_norm=close(K.rms_norm(x, w), K.rms_norm_ref(x, w)),
                rope=all(close(a, b) for a, b in zip(K.apply_rope(q, k, cos, sin),
                                                     K.apply_rope_ref(q, k, cos, sin))),
                swiglu=close(K.swiglu(g, u), K.swiglu_ref(g, u)),
                cross_entropy=close(K.cross_entropy(logits, labels), K.cross_entropy_ref(logits, labels)),
                lora=close(K.lora_linear(x, W, A, B, 2.0), K.lora_linear_ref(x, W, A, B, 2.0)),
                nf4=torch.equal(dequantize_4bit(packed, state), dequantize_4bit_ref(packed, state)),
            )
        print("ok", all(ok.values()), ok)
        print("left", [k for k in %r if k in os.environ])
    """ % (VARS, VARS), tmp_path)
    lines = out.splitlines()
    assert lines[0] == "left []", out
    assert lines[1] == "ours InterpretedFunction", out
    assert lines[2] == "user False", out
    assert lines[3].startswith("ok True"), out
    assert lines[4] == "left []", out


@pytest.mark.slow  # a subprocess
def test_a_value_the_user_set_is_kept(tmp_path):
    out = run_clean("""
        import os
        os.environ["TRITON_INTERPRET"] = "0"
        os.environ["HF_HUB_OFFLINE"] = "0"
        import pelib, pelib.kernels
        print(os.environ["TRITON_INTERPRET"], os.environ["HF_HUB_OFFLINE"])
    """, tmp_path)
    assert out.split() == ["0", "0"]


@pytest.mark.slow  # a subprocess
def test_the_command_line_is_offline(tmp_path):
    """The CLI turns the hub off, also in huggingface_hub's flag read when `import pelib` ran."""
    out = run_clean("""
        import os, sys
        import pelib                      # as `python -m pelib` does, before pelib/__main__.py
        import huggingface_hub.constants as hub
        before = hub.is_offline_mode()
        import pelib.__main__
        print(before, hub.is_offline_mode(), os.environ["HF_HUB_OFFLINE"],
              os.environ["TRANSFORMERS_OFFLINE"], os.environ["TOKENIZERS_PARALLELISM"])
    """, tmp_path)
    assert out.split() == ["False", "True", "1", "1", "false"]
