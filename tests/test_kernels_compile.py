"""Every kernel compiles for an H100/H200 (sm_90) on this CPU machine: no interpreter-only code.

A subprocess imports the kernels with TRITON_INTERPRET=0 and runs Triton's full compiler
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas shipped in the triton wheel) for one
target; nothing is launched, so no GPU is needed. bf16 variants exercise `round_to`.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

SCRIPT = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from importlib import import_module
    nf4, rmsnorm, swiglu, rope, ce = (import_module("pelib.kernels." + m) for m in
                                      ("nf4", "rmsnorm", "swiglu_kernel", "rope", "cross_entropy_kernel"))

    def build(fn, sig, consts, **options):
        sig = dict(sig, **{k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert "cubin" in k.asm
        print("ok", fn.__name__)

    P = lambda t: "*" + t
    build(nf4._nf4_dequant_kernel, dict(packed_ptr=P("u8"), absmax_ptr=P("fp32"), qabsmax_ptr=P("u8"),
          absmax2_ptr=P("fp32"), code2_ptr=P("fp32"), offset_ptr=P("fp32"), code_ptr=P("fp32"),
          out_ptr=P("bf16"), n_bytes="i32", n="i32"),
          dict(HALF_BLOCKSIZE=32, BLOCKSIZE2=256, DOUBLE=True, BLOCK=1024), enable_fp_fusion=False)
    for dt in ("bf16", "fp16"):
        build(rmsnorm._rmsnorm_fwd_kernel, dict(x_ptr=P(dt), w_ptr=P(dt), y_ptr=P(dt), rstd_ptr=P("fp32"),
              n_rows="i32", H="i32", sx="i32", sy="i32", eps="fp32"), dict(BLOCK_R=1, BLOCK_H=4096))
    build(rmsnorm._rmsnorm_bwd_kernel, dict(dy_ptr=P("bf16"), x_ptr=P("bf16"), w_ptr=P("bf16"),
          rstd_ptr=P("fp32"), dx_ptr=P("bf16"), dw_partial_ptr=P("fp32"), n_rows="i32", H="i32",
          sdy="i32", sx="i32", sdx="i32"), dict(BLOCK_R=1, BLOCK_H=4096))
    build(swiglu._swiglu_fwd_kernel, dict(g_ptr=P("bf16"), u_ptr=P("bf16"), h_ptr=P("bf16"), n="i32"),
          dict(BLOCK=1024))
    build(swiglu._swiglu_bwd_kernel, dict(dh_ptr=P("bf16"), g_ptr=P("bf16"), u_ptr=P("bf16"),
          dg_ptr=P("bf16"), du_ptr=P("bf16"), n="i32"), dict(BLOCK=1024))
    ints = "Hq Hk T sqb sqh sqt skb skh skt sqob sqoh sqot skob skoh skot scb sct".split()
    build(rope._rope_kernel, dict(q_ptr=P("bf16"), k_ptr=P("bf16"), qo_ptr=P("bf16"), ko_ptr=P("bf16"),
          cos_ptr=P("bf16"), sin_ptr=P("bf16"), **{k: "i32" for k in ints}),
          dict(HALF=32, BLOCK_T=32, BLOCK_D=32, BACKWARD=True))
    build(ce._ce_fwd_kernel, dict(x_ptr=P("bf16"), y_ptr=P("i64"), loss_ptr=P("fp32"), lse_ptr=P("fp32"),
          N="i32", V="i32", sx="i32", ignore_index="i32"), dict(BLOCK_N=1, BLOCK_V=4096))
    build(ce._ce_bwd_kernel, dict(x_ptr=P("bf16"), y_ptr=P("i64"), lse_ptr=P("fp32"), scale_ptr=P("fp32"),
          dx_ptr=P("bf16"), N="i32", V="i32", sx="i32", sdx="i32", ignore_index="i32"),
          dict(BLOCK_N=1, BLOCK_V=4096))
''')


@pytest.mark.slow  # a subprocess: Triton's full compiler
def test_kernels_compile_for_sm90():
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton wheel ships no ptxas")
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 9, r.stdout
