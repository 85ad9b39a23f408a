"""The comparison runner (`python -m pelib compare`): runs, skips finished runs, summarises."""
import json

import pytest

from pelib.compare import main, preset, summary

pytestmark = pytest.mark.integration  # the compare runner


@pytest.mark.slow  # the compare runner trains
def test_smoke_subset_runs_summarises_and_skips_finished_runs(tmp_path, capsys):
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--only", "LoRA r=2", "Houlsby",
            "--no-progress"]
    main(argv)
    text = (tmp_path / "summary_smoke.md").read_text()
    assert "| LoRA r=2 | pelib | 1 |" in text and "| Houlsby adapter m=64 | pelib | 1 |" in text
    assert "smollm2-tiny on banking77" not in text  # --only kept the MiniLM rows only
    for fig in ("f1_vs_params_smoke.png", "memory_smoke.png", "losses_smoke.png"):
        assert (tmp_path / fig).stat().st_size > 1000
    records = json.loads((tmp_path / "summary_smoke.json").read_text())
    assert len(records) == 2 and summary(records) == text  # the table rebuilds from the JSON
    # each run recorded its ledger (the memory figure's bars), beside its peak RSS
    assert all(list(r["ledger"]["bytes"]) == list(KINDS) and r["ledger"]["batch"][0] == 16
               for r in records)
    assert "| memory of |" in text and "| LoRA r=2 | " in text.split("| memory of |")[1]
    assert not list(tmp_path.glob("*.ckpt"))  # checkpoints are removed once results exist

    run, = tmp_path.glob("minilm-tiny_banking77_lora-r2_pelib_s0_*.json")
    stamp = run.stat().st_mtime_ns
    main(argv)  # everything is done: nothing runs again
    assert run.stat().st_mtime_ns == stamp
    # --finished summarises what is done and runs nothing, even where more runs match --only
    before = sorted(tmp_path.glob("*.json"))
    main(argv[:-1] + ["SoRA", "--finished", "--no-progress"])
    assert sorted(tmp_path.glob("*.json")) == before
    assert "2 of the 4 runs have finished" in capsys.readouterr().out
    assert "SoRA" not in (tmp_path / "summary_smoke.md").read_text()
    with pytest.raises(SystemExit, match="no run of preset smoke has finished"):
        main(["--preset", "smoke", "--out", str(tmp_path / "empty"), "--finished"])
    rec = json.loads(run.read_text())
    rec["args"]["epochs"] = 7.0  # a result left by other settings is not reused
    run.write_text(json.dumps(rec))
    main(argv)
    assert json.loads(run.read_text())["args"]["epochs"] == 1.0


@pytest.mark.slow  # the compare runner trains
def test_runs_that_differ_only_in_lr_do_not_share_a_file(tmp_path):
    """Two runs whose default names agree (the name has no lr) get separate result files."""
    from pelib.compare import run_all

    common = ["--model", "minilm", "--data", "banking77", "--seed", "0", "--method", "lora",
              "--r", "2", "--tiny", "--train-limit", "32", "--eval-limit", "16", "--epochs", "1"]
    a, b = run_all([("a", common), ("b", common + ["--lr", "0.01"])], tmp_path, progress=False)
    assert a["name"] != b["name"] and a["args"]["lr"] is None and b["args"]["lr"] == 0.01
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_presets_cover_every_method_and_the_peer():
    def methods(runs):
        return {(a[a.index("--method") + 1], "--impl" in a) for _, a in runs}

    runs = preset("workshop")  # make run: the floor, full, the LoRA family, one peft twin
    assert methods(runs) == {("head", False), ("full", False), ("lora", False), ("qlora", False),
                             ("adalora", False), ("sora", False), ("lora", True)}
    assert all("--train-limit" not in a for _, a in runs)  # full size
    assert runs[0][0] == "head only (floor)"  # every table starts with its floor
    # one epoch: every fine-tune starts from the probe head (LP-FT); the floor trains its own
    assert all(("--head-init" in a) == (a[a.index("--method") + 1] != "head") for _, a in runs)
    full = preset("full")
    assert {m for m, peer in methods(full) if not peer} == {
        "head", "full", "lora", "dora", "qlora", "adalora", "sora", "adapter", "prefix"}
    labels = [label for label, a in full if "--seed" in a and a[a.index("--seed") + 1] == "0"
              and a[a.index("--data") + 1] == "banking77"]
    assert labels[labels.index("LoRA r=8") + 1] == "DoRA r=8"  # DoRA beside LoRA r=8
    assert {m for m, peer in methods(full) if peer} == {"lora", "qlora", "adalora"}
    kinds = {a[a.index("--adapter-kind") + 1] if "--adapter-kind" in a else "houlsby"
             for _, a in full if a[a.index("--method") + 1] == "adapter"}
    assert kinds == {"houlsby", "pfeiffer"}  # both bottleneck placements of notebook 01
    assert {a[a.index("--seed") + 1] for _, a in full} == {"0", "1", "2"}
    assert {a[a.index("--data") + 1] for _, a in full} == {"banking77", "clinc150"}
    assert all("--max-grad-norm" in a for _, a in full if a[a.index("--method") + 1] == "prefix")
    lr = {(a[a.index("--data") + 1], a[a.index("--method") + 1]):
          a[a.index("--lr") + 1] if "--lr" in a else "default" for _, a in full}
    assert lr[("clinc150", "prefix")] == "1.5e-3"  # chosen on CLINC150's own dev split
    assert lr[("clinc150", "sora")] == "1e-3" and lr[("banking77", "sora")] == "default"
    assert lr[("clinc150", "head")] == "1.5e-2" and lr[("banking77", "head")] == "default"
    assert lr[("banking77", "prefix")] == lr[("clinc150", "lora")] == "default"
    seeds = preset("seeds")  # its seed-0 runs are the workshop's (same arguments: reused)
    assert [a for _, a in seeds if a[a.index("--seed") + 1] == "0"] == [a for _, a in runs]
    llm = preset("llm")
    assert {a[a.index("--model") + 1] for _, a in llm} == {"smollm2"}
    assert methods(llm) == {("head", False), ("full", False), ("lora", False), ("qlora", False),
                            ("sora", False)}  # full: the optimizer state LoRA saves
    grid = preset("lr")  # three learning rates per method, judged on the dev split
    assert all(a[a.index("--eval-split") + 1] == "dev" for _, a in grid)
    assert len(grid) == 3 * len({label.split(" lr=")[0] for label, _ in grid})
    clinc = preset("lr-clinc150")  # the same grid on CLINC150, around the lrs its dev chose
    assert {a[a.index("--data") + 1] for _, a in clinc} == {"clinc150"}
    assert [a.index("--data") for _, a in clinc] == [a.index("--data") for _, a in grid]
    lrs = {label.split(" lr=")[0]: [] for label, _ in clinc}
    for label, a in clinc:
        assert a.count("--lr") == 1  # one lr per run, not a default overridden later
        lrs[label.split(" lr=")[0]].append(a[a.index("--lr") + 1])
    assert lrs["prefix tuning L=16"] == ["0.00075", "0.0015", "0.003"]
    assert lrs["LoRA r=8"] == ["0.001", "0.002", "0.004"]
    sft = preset("sft-lr")  # instruction tuning's LoRA around its lr, on a third of the rows, on dev
    assert [a[a.index("--lr") + 1] for _, a in sft] == ["0.001", "0.002", "0.004"]
    assert all(a[a.index("--task") + 1] == "sft" and a[a.index("--eval-split") + 1] == "dev"
               and a[a.index("--train-limit") + 1] == "3000" and a.count("--lr") == 1 for _, a in sft)
    seeds = preset("sft-seeds")  # LoRA and QLoRA over 3 seeds; seed 0 is the sft preset's run
    assert [(label, a[a.index("--seed") + 1]) for label, a in seeds] == [
        (label, seed) for seed in "012" for label in ("LoRA r=8, SFT", "QLoRA r=8 (NF4+DQ), SFT")]
    one_seed = [a for _, a in preset("sft")]
    assert all(a in one_seed for _, a in seeds[:2])  # the same arguments, so the same file: reused


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(SystemExit):
        main(["--preset", "huge"])  # argparse names the choices
    with pytest.raises(SystemExit, match="matches no run"):
        main(["--preset", "smoke", "--out", str(tmp_path), "--only", "nonexistent"])
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SystemExit, match="cannot write results"):
        main(["--preset", "smoke", "--out", str(blocked / "sub")])


def test_presets_are_data_that_name_registry_entries():
    """Every row names a registry entry, every preset draws on the rows by name, and a row's
    finetune options parse for its method (an option the method lacks would be refused)."""
    from pelib.compare import PRESETS, ROWS
    from pelib.methods import METHODS
    from pelib.options import check, parse

    assert all(row.method in METHODS for row in ROWS.values())
    assert all(set(part.rows) <= set(ROWS) for parts in PRESETS.values() for part in parts)
    for name in PRESETS:
        for label, argv in preset(name):
            check(parse(argv))  # raises ValueError for an option the method lacks
    with pytest.raises(SystemExit, match="unknown preset 'nope'"):
        preset("nope")


KINDS = ("frozen weights", "trainable (adapter + head)", "gradients", "optimizer state",
         "activations saved for backward")


def record(label, method, peak_mb, ledger_mib=None):
    """A run's record as finetune writes it (the fields the tables and figures read)."""
    r = dict(name=label, label=label, metrics=dict(accuracy=0.5, precision=0.5, recall=0.5, f1=0.5),
             trainable_params=10, total_params=100, peak_memory_mb=peak_mb, seconds_per_step=0.1,
             train_seconds=1.0, losses=[1.0, 0.5], history=[dict(epoch=1, loss=0.7)],
             train_rows=64, eval_rows=32, eval_split="test", memory_kind="process RSS (sampled)",
             args=dict(model="minilm", tiny=True, data="banking77", method=method, impl="pelib",
                       epochs=1.0, batch_size=16, max_length=32))
    if ledger_mib is not None:
        r["ledger"] = dict(bytes={k: int(v * 2**20) for k, v in zip(KINDS, ledger_mib)}, batch=[16, 32])
    return r


def test_the_memory_figure_stacks_each_runs_ledger_and_marks_its_peak(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pelib.report import RSS_NOTE, _group, figures, memory_panel

    records = [record("full", "full", 900.0, [0.0, 100.0, 100.0, 200.0, 30.0]),
               record("LoRA", "lora", 700.0, [100.0, 1.0, 1.0, 2.0, 40.0]),
               record("old QLoRA", "qlora", 800.0)]  # written before runs kept their ledger
    rows = next(iter(_group(records).values()))
    fig, ax = plt.subplots()
    memory_panel(ax, rows, "process RSS (sampled)")
    # one bar segment per kind and row, as wide as the record says, stacked left to right
    widths = [round(p.get_width(), 6) for p in ax.patches]
    lefts = [round(p.get_x(), 6) for p in ax.patches]
    assert widths == [0.0, 100.0, 0.0, 100.0, 1.0, 0.0, 100.0, 1.0, 0.0, 200.0, 2.0, 0.0,
                      30.0, 40.0, 0.0]
    assert lefts[-3:] == [400.0, 104.0, 0.0]  # saved activations start where the rest ends
    peaks, = [line for line in ax.lines if line.get_marker() == "D"]
    assert list(peaks.get_xdata()) == [900.0, 700.0, 800.0]
    assert [t.get_text() for t in ax.texts] == ["no ledger in this record"]
    plt.close(fig)
    text = summary(records)
    assert "| full | 16x32 | 0.00 | 100.00 | 100.00 | 200.00 | 30.00 | 430.00 | 900 | 470 |" in text
    assert "| old QLoRA | - | - | - | - | - | - | - | 800 | - |" in text
    assert RSS_NOTE in text and "before runs kept their ledger" in text
    paths = figures(records, tmp_path)
    assert tmp_path / "memory.png" in paths and (tmp_path / "memory.png").stat().st_size > 1000
