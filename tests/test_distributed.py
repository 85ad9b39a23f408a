"""Data-parallel training: 2 CPU processes under torchrun (gloo) equal 1 process with the same
global batch; only rank 0 writes. See pelib/distributed.py for the arithmetic."""
import json
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration  # torchrun: two processes

SCRIPT = """
import json, sys
import torch
import pelib
import pelib.distributed
from pelib.distributed import rank
from pelib.sora import SoRA, apply_sora
from pelib.train import TrainConfig, train

out = sys.argv[1]
model, tok = pelib.tiny_backbone("minilm", 77, seed=0)
for m in model.modules():  # no dropout: each process would draw its own masks
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0
apply_sora(model, ["query", "value"], r=4, alpha=8)
data = pelib.load_nlu("banking77", "train", limit=51)  # the last batch of 3 splits 2 + 1
hook = SoRA(3.0, gate_lr=0.1)  # the prox follows the gradients: they must be the averaged ones
res = train(model, tok, data, data, TrainConfig(epochs=2, lr=5e-3, batch_size=12, grad_accum=2,
                                                progress=False), hooks=[hook])
if rank() == 0:
    torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, out + ".pt")
    with open(out + ".json", "w") as f:
        json.dump(dict(losses=res.losses, metrics=res.metrics, world=res.world_size), f)
pelib.distributed.finish()
"""


def _run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def torchrun(n):
    with socket.socket() as s:  # a free port: no clash with another run on this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    (tmp_path / "s.py").write_text(SCRIPT)
    _run([sys.executable, "s.py", "one"], tmp_path)
    _run(torchrun(2) + ["s.py", "two"], tmp_path)
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
    w1, w2 = (torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), k
    gates = [k for k in w1 if k.endswith(".gate")]
    assert any((w2[k] == 0).any() for k in gates)  # the prox zeroed gates in both
    assert all(torch.equal(w1[k] == 0, w2[k] == 0) for k in gates)


def test_cli_under_torchrun_writes_one_result_with_its_world_size(tmp_path):
    argv = ["-m", "pelib", "finetune", "--tiny", "--train-limit", "40", "--eval-limit", "30",
            "--epochs", "1", "--batch-size", "8", "--lora-r", "2", "--no-progress"]
    _run([sys.executable, *argv, "--out", "one", "--name", "run"], tmp_path)
    _run(torchrun(2) + argv + ["--out", "two", "--name", "run"], tmp_path)
    written = sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith("."))
    assert written == ["run.json", "run_loss.png"]  # one result: rank 0's
    one, two = (json.loads((tmp_path / k / "run.json").read_text()) for k in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["eval_rows"] == 30  # the gathered evaluation covers the split once
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3)
