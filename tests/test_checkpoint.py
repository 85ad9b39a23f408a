"""Checkpoints: read without running code, and never resumed into a run with other options."""
import pytest
import torch

from pelib.__main__ import main
from pelib.hooks import Hook


class _Planted:
    """A pickle that runs code when loaded (what a planted checkpoint would carry)."""
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_checkpoints_are_read_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["finetune", "--tiny", "--train-limit", "16", "--eval-limit", "8", "--epochs", "1",
            "--out", str(tmp_path), "--no-progress", "--name", "run", "--resume"]
    torch.save({"run": _Planted()}, tmp_path / "run.ckpt")
    with pytest.raises(SystemExit, match="cannot be read as a pelib checkpoint.*delete it"):
        main(argv)
    assert not (tmp_path / "PWNED").exists()
    (tmp_path / "run.ckpt").write_bytes(b"\x80\x02truncated")
    with pytest.raises(SystemExit, match="cannot be read as a pelib checkpoint"):
        main(argv)


def test_resume_refuses_a_checkpoint_of_other_options(tmp_path):
    """alpha, train-limit, dropout... are not TrainConfig fields, but they decide the numbers."""
    from pelib.finetune import build
    from pelib.options import options, parse
    from pelib.runs import numbers
    from pelib.train import TrainConfig, train

    class Stop(Hook):
        def step(self, model, step):
            if step == 2:  # after the checkpoint of step 1
                raise KeyboardInterrupt

    def cfg(args, ckpt):
        return TrainConfig(epochs=1, batch_size=8, progress=False, checkpoint=ckpt,
                           checkpoint_every=1, run=numbers(options(args)))

    ckpt = str(tmp_path / "c.ckpt")
    args = parse(["--tiny", "--train-limit", "32", "--r", "2"])
    model, tok, data, hooks = build(args, cfg(args, ckpt))
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, data, data, cfg(args, ckpt), hooks=[Stop()])
    assert (tmp_path / "c.ckpt").exists()
    other = parse(["--tiny", "--train-limit", "32", "--r", "2", "--alpha", "64"])
    model, tok, data, hooks = build(other, cfg(other, ckpt))
    with pytest.raises(ValueError, match="another run"):
        train(model, tok, data, data, cfg(other, ckpt))
