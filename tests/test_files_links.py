"""No file pelib creates is written through a link planted at its name.

For each kind of file (lock, write probe, temporary, record, figure, checkpoint, adapter) a
symbolic link to a victim file is planted where pelib writes; the victim must be unchanged, and
pelib either refuses with a clear error (a lock is pelib's own file) or replaces the link with
its file (every file written by `atomic_write`: rename replaces a link, never follows it).
"""
import os
import threading

import pytest
import torch
from conftest import tiny

import pelib
from pelib.files import atomic_write, open_lock, writable_dir, write_text

SECRET = "the victim's bytes\n"
FT = ["finetune", "--tiny", "--train-limit", "16", "--eval-limit", "16", "--epochs", "1", "--batch-size", "8",
      "--max-length", "16", "--no-progress"]


@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim.txt"
    v.write_text(SECRET)
    return v


def plant(link, victim):
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    return link


def replaced(link, victim):
    """The victim is untouched and the name now holds pelib's own plain file."""
    return victim.read_text() == SECRET and link.is_file() and not link.is_symlink()


def test_a_link_at_the_lock_is_refused(tmp_path, victim):
    link = plant(tmp_path / "out" / ".x.lock", victim)
    with pytest.raises(ValueError, match=r"\.x\.lock is a symbolic link .* remove the link"):
        open_lock(link)
    assert victim.read_text() == SECRET and link.is_symlink()


def test_a_lock_file_hard_linked_to_a_victim_is_not_truncated(tmp_path, victim):
    os.link(victim, tmp_path / ".x.lock")
    open_lock(tmp_path / ".x.lock").close()
    assert victim.read_text() == SECRET


def test_the_cli_refuses_a_link_at_its_lock(tmp_path, victim):
    from pelib.__main__ import main

    plant(tmp_path / "out" / ".x.lock", victim)
    with pytest.raises(SystemExit, match="symbolic link"):
        main(FT + ["--out", str(tmp_path / "out"), "--name", "x"])
    assert victim.read_text() == SECRET


def test_the_write_probe_never_meets_a_planted_link(tmp_path, victim):
    out = tmp_path / "out"
    for name in (".pelib-write-test", ".pelib-write-test.x"):  # the fixed name, a guessed one
        plant(out / name, victim)
    assert writable_dir(out) == out
    assert victim.read_text() == SECRET
    assert sorted(p.name for p in out.iterdir()) == [".pelib-write-test", ".pelib-write-test.x"]


def test_probes_of_one_folder_do_not_collide(tmp_path):
    """Each probe is a file of its own: many writers probing one folder all see it writable."""
    errors = []

    def probe():
        try:
            for _ in range(300):
                writable_dir(tmp_path)
        except ValueError as e:
            errors.append(e)

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and list(tmp_path.iterdir()) == []


def test_an_empty_out_is_refused():
    with pytest.raises(ValueError, match="--out is empty"):
        writable_dir("")


def test_temporaries_never_follow_a_link(tmp_path, victim):
    """Links planted where temporaries live (names of a writer that is gone, pid 2**22 + 1 is
    above Linux's pid_max) are removed as stale, never followed; a folder behind a link keeps its
    files. The temporary itself is made by mkdir, which no link can redirect."""
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (victim_dir / "keep").write_text(SECRET)
    out = tmp_path / "out"
    plant(out / f".r.json.{2**22 + 1}.a.tmp", victim)
    plant(out / f".r.json.{2**22 + 1}.b.tmp", victim_dir)
    write_text(out / "r.json", "{}")
    assert victim.read_text() == SECRET and (victim_dir / "keep").read_text() == SECRET
    assert sorted(p.name for p in out.iterdir()) == ["r.json"]


def test_a_link_made_by_the_writer_is_refused(tmp_path, victim):
    target = tmp_path / "r.json"
    with pytest.raises(ValueError, match="did not produce a plain file"):
        atomic_write(target, lambda tmp: os.symlink(victim, tmp))
    assert victim.read_text() == SECRET and not target.exists() and list(tmp_path.iterdir()) == [victim]


def test_a_folder_at_the_target_is_named(tmp_path):
    (tmp_path / "r.json").mkdir()
    with pytest.raises(ValueError, match=r"r\.json is a folder, where pelib writes a file"):
        write_text(tmp_path / "r.json", "{}")


@pytest.mark.slow  # a tiny fine-tune through the CLI
def test_record_and_figure_replace_a_planted_link(tmp_path, victim):
    from pelib.__main__ import main

    out = tmp_path / "out"
    record, figure = plant(out / "x.json", victim), plant(out / "x_loss.png", victim)
    assert main(FT + ["--out", str(out), "--name", "x", "--overwrite"]) == 0
    assert replaced(record, victim) and replaced(figure, victim)
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_a_checkpoint_replaces_a_planted_link(tmp_path, victim):
    from pelib.train import TrainConfig, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = plant(tmp_path / "x.ckpt", victim)
    save_checkpoint(ckpt, model, opt, sched, [], {"step": 0}, TrainConfig())
    assert replaced(ckpt, victim)
    assert torch.equal(torch.load(ckpt, weights_only=True)["trainable"]["weight"], model.weight)


def test_an_adapter_replaces_planted_links(tmp_path, victim):
    model = pelib.apply_lora(tiny(), ["query", "value"], r=2)
    folder = tmp_path / "adapter"
    links = [plant(folder / name, victim) for name in ("adapter_model.safetensors", "adapter_config.json")]
    pelib.save_adapter(model, folder)
    assert all(replaced(link, victim) for link in links)
    pelib.load_adapter(tiny(), folder)  # pelib's own files, readable
