"""bench/gpu.sh's CPU path: tiny sizes, the result files written (no timing asserted)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # a subprocess: bench/gpu.sh
def test_gpu_script_cpu_path_writes_results(tmp_path):
    env = dict(os.environ, BENCH_FLAGS="", PYTHON=sys.executable, FINETUNE_ROWS="64",
               FINETUNE_FLAGS="--tiny --eval-limit 32 --max-length 32")
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    names = [row["case"] for row in data["rows"]]
    assert names == ["nf4_dq_dequant", "rmsnorm_fwd_bwd", "swiglu_fwd_bwd", "rope_qk_fwd_bwd",
                     "cross_entropy_fwd_bwd", "lora_mlp_fwd_bwd", "qlora_step"]
    for f in ("results.md", "bench.log", "env.txt"):
        assert (tmp_path / f).stat().st_size > 0
    for row in data["rows"]:
        assert row["limit_ms"] > 0
        assert any(k.startswith("torch") and k.endswith("_ms") and v > 0 for k, v in row.items())
        assert row["rel_diff"] < 2e-2                        # bf16: ours and torch agree
    assert data["rows"][0]["rel_diff"] == 0                  # NF4 dequant is bit-exact
    step = data["rows"][-1]                                  # QLoRA step, fp32 on the CPU: same loss
    assert step["rel_diff"] < 1e-5 and step["torch_ms"] > 0 and step["ours_ms"] is None
    # the SmolLM2 QLoRA fine-tune, kernels on and off (toy size here; no kernels on a CPU)
    runs = {k: json.loads((tmp_path / f"smollm2_qlora_kernels_{k}.json").read_text())
            for k in ("on", "off")}
    assert runs["off"]["args"]["no_kernels"] and not runs["on"]["args"]["no_kernels"]
    for rec in runs.values():
        assert rec["args"]["method"] == "qlora" and rec["train_rows"] == 64
        assert rec["seconds_per_step"] > 0 and rec["kernels"] is False
