"""The method table and the shape around it: the CLI reads the table, layers import downwards,
adapter files load through one loader that refuses what does not fit."""
import ast
import json
from pathlib import Path
from unittest import mock

import pytest
import torch

import pelib
from pelib import methods
from pelib.__main__ import main
from pelib.hooks import Hook
from pelib.io import CONFIG_NAME, WEIGHTS_NAME

PELIB = Path(pelib.__file__).resolve().parent
# Each module may import only modules of a lower rank (its own package's modules excepted).
RANK = {"files": 0, "recipe": 0, "linear_ce": 0, "metrics": 0, "data": 0, "classifier": 0,
        "measure": 0, "kernels": 0, "probe": 0, "distributed": 0, "batching": 0, "schedule": 0,
        "backbone": 1, "inject": 1, "io": 1, "evaluation": 1, "checkpoint": 1, "settings": 1,
        "lora": 2, "adapter": 2, "prefix": 2, "hooks": 2, "optim": 2, "sft": 2,
        "adalora": 3, "sora": 3, "dora": 3,
        "quant": 3, "train": 4, "peers": 5, "sft_train": 5, "methods": 6, "patch": 7,
        "options": 7, "report": 7,
        "runs": 8, "finetune": 9, "bench": 9, "compare": 10, "__main__": 11, "__init__": 12}
# No exceptions: kernels/ are leaves (a 4-bit W's dequantisers are handed to the LoRA kernel
# by pelib.quant, which imports kernels, not the other way round).
ALLOWED: set[tuple[str, str]] = set()


def tiny():
    return pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0]


def batch(vocab=30522):
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.randint(5, vocab, (3, 11), generator=g),
                attention_mask=torch.ones(3, 11, dtype=torch.long))


def _unit(path: Path) -> str:
    rel = path.relative_to(PELIB).parts
    return rel[0].removesuffix(".py") if len(rel) > 1 or rel[0] != "__init__.py" else "__init__"


def _imports(path: Path):
    """pelib modules imported anywhere in the file (top level or inside functions)."""
    rel = path.relative_to(PELIB).parts
    package = ["pelib", *rel[:-1]]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "pelib" and len(parts) > 1:
                yield parts[1]


def test_layers_import_downwards_only():
    bad = []
    for path in sorted(PELIB.rglob("*.py")):
        unit = _unit(path)
        assert unit in RANK, f"{path}: new module, give it a rank in this test"
        for dep in set(_imports(path)):
            if dep != unit and RANK[dep] >= RANK[unit] and (unit, dep) not in ALLOWED:
                bad.append(f"{path.relative_to(PELIB)} imports pelib.{dep}")
    assert not bad, bad


def test_a_new_method_is_one_table_entry(tmp_path, monkeypatch):
    """Add a method (train only the head) as one entry: the CLI offers it, names the run with
    its tag, takes its lr, and trains only what its builder left trainable."""
    from dataclasses import dataclass
    from typing import ClassVar

    from pelib.recipe import Recipe

    @dataclass(frozen=True)
    class ProbeConfig(Recipe):
        lr: ClassVar[float] = 7e-3

        def tag(self):
            return "-head"

    def head_only(model, config, run):
        assert isinstance(config, ProbeConfig)
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier"))
        return model, []

    monkeypatch.setitem(methods.METHODS, "probe", methods.Method(
        ProbeConfig, build={"pelib": head_only}, help="the head alone"))
    main(["finetune", "--tiny", "--method", "probe", "--train-limit", "32", "--eval-limit", "16",
          "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    rec = json.loads((tmp_path / "minilm-tiny_banking77_probe-head_pelib_s0.json").read_text())
    assert rec["config"]["lr"] == 7e-3
    assert rec["trainable_params"] == 32 * 77 + 77  # the 77-way head of a 32-wide model


@pytest.mark.parametrize("argv,message", [
    (["--method", "lora", "--init-r", "4"], "--init-r is an option of --method adalora"),
    (["--method", "sora", "--impl", "peft"], "--impl peft is only for --method lora, qlora"),
    (["--method", "lora", "--lr", "0"], "lr must be a finite number > 0"),
    (["--method", "lora", "--lr", "inf"], "lr must be a finite number > 0"),
    (["--method", "lora", "--epochs", "inf"], "epochs must be a finite number > 0"),
    (["--method", "lora", "--max-length", "1"], "no room for text"),
    (["--method", "lora", "--max-length", "1000"], "exceeds the model's 128 position"),
    (["--method", "lora", "--name", "../x"], "plain file stem"),
    (["--method", "lora", "--dropout", "1.5"], "dropout must be in"),
    (["--method", "lora", "--alpha", "nan"], "alpha must be a finite number"),
])
def test_cli_options_that_do_not_fit_are_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["finetune", "--tiny", "--train-limit", "8", "--out", str(tmp_path), *argv])


@pytest.mark.parametrize("method,option", [
    ("adapter", ["--r", "4"]), ("full", ["--r", "4"]), ("adalora", ["--r", "4"]),
    ("head", ["--r", "4"]), ("head", ["--alpha", "8"]), ("prefix", ["--dropout", "0.1"]),
    ("adapter", ["--dropout", "0.1"]), ("adapter", ["--targets", "query"]),
    ("prefix", ["--targets", "query"]), ("sora", ["--rslora"]), ("adalora", ["--rslora"]),
    ("full", ["--rslora"]), ("lora", ["--bottleneck", "8"]), ("head", ["--lora-r", "4"]),
])
def test_an_option_the_method_lacks_is_refused(tmp_path, method, option):
    """The method options come from the configs' fields: one the method's config does not have
    is an error naming the option and the method, before anything is built."""
    flag = "--r" if option[0] == "--lora-r" else option[0]
    with mock.patch("pelib.finetune.build", side_effect=AssertionError("built")):
        with pytest.raises(SystemExit, match=f"^pelib: {flag} is an option of --method .*, "
                                             f"not {method}$"):
            main(["finetune", "--tiny", "--method", method, "--out", str(tmp_path), *option])


def test_the_cli_options_are_the_config_fields():
    """Every field of every registry config is a finetune option, with the recipe's default
    when it is not given; options of no config are not method options."""
    import dataclasses

    from pelib.options import config_of, method_options, parse
    from pelib.recipe import flags_of

    fields = {f.name for m in methods.METHODS.values() for f in dataclasses.fields(m.config)}
    assert set(method_options()) == fields
    for name, m in methods.METHODS.items():
        assert config_of(parse(["--method", name])) == m.config()  # nothing given: the recipe
    for f, owners in method_options().values():
        assert all(flag.startswith("--") for flag in flags_of(f)) and owners
    c = config_of(parse(["--method", "sora", "--r", "4", "--gate-lr", "0.5"]))
    assert (c.r, c.alpha, c.gate_lr, c.sparse_lambda) == (4, 8, 0.5, methods.SoRAConfig.sparse_lambda)


def test_the_python_api_defaults_are_the_recipe():
    """apply_lora, TrainConfig, RankAllocator and SoRA default to what the CLI trains."""
    from pelib.adalora import AdaLoRAConfig, RankAllocator, apply_adalora
    from pelib.finetune import parse
    from pelib.lora import LoRAConfig
    from pelib.sora import SoRA, SoRAConfig
    from pelib.train import TrainConfig

    cli = parse([])
    model = pelib.apply_lora(tiny(), ["query"], r=2)
    layer = pelib.lora.lora_layers(model)[0][1]
    assert (layer.alpha, layer.scaling) == (4, 2.0)  # alpha = 2r
    assert model.pelib_adapter["lora_alpha"] == 4
    cfg = TrainConfig()
    assert (cfg.lr, cfg.head_lr, cfg.label_smoothing) == (
        methods.METHODS["lora"].lr, LoRAConfig.head_lr, LoRAConfig.label_smoothing)
    assert (cfg.epochs, cfg.batch_size, cfg.max_length, cfg.warmup_ratio, cfg.schedule) == (
        cli.epochs, cli.batch_size, cli.max_length, cli.warmup_ratio, cli.schedule)
    head = TrainConfig.of(methods.METHODS["head"].config())
    assert head.lr == head.head_lr == methods.METHODS["head"].lr  # the floor's head is the method
    assert TrainConfig.of(methods.METHODS["full"].config()).lr == methods.FullConfig.lr
    alloc = RankAllocator(apply_adalora(tiny(), ["query"]), total_step=100)
    assert (alloc.tinit, alloc.tfinal, alloc.deltaT, alloc.target_r) == (
        *AdaLoRAConfig().schedule(100), AdaLoRAConfig.delta_t, AdaLoRAConfig.target_r) == (10, 30, 10, 8)
    hook = SoRA()
    hook.schedule.begin(9)
    assert [hook.schedule(s) for s in (1, 4, 7)] == pytest.approx([0.05, 0.25, 0.45])
    assert hook.gate_lr == SoRAConfig.gate_lr == 1e-2


@pytest.mark.parametrize("method", ["lora", "qlora", "sora"])
def test_configs_round_trip_through_peft_config(tmp_path, method):
    """to_peft / from_peft: a config survives adapter_config.json, and peft reads a LORA one."""
    config = methods.METHODS[method].config(r=4, dropout=0.1, targets=["query", "value"])
    again = type(config).from_peft(dict(config.to_peft(), target_modules=["query", "value"]))
    assert again == config and again.alpha == 8
    if method != "sora":
        from peft import LoraConfig

        peer = LoraConfig(**{k: v for k, v in config.to_peft().items() if k != "peft_type"})
        assert (peer.r, peer.lora_alpha, peer.lora_dropout, peer.use_rslora) == (4, 8, 0.1, False)


def test_a_record_of_old_options_is_the_same_run():
    """Records written when every option had its old default (r 8 for every method, SoRA's
    schedule None) are the same runs as the new options that leave them out."""
    from pelib.options import options, parse
    from pelib.runs import same_run

    old = dict(options(parse(["--method", "adalora"])), r=8, alpha=None, dropout=0.0,
               rslora=False, adapter_kind="houlsby", bottleneck=64, sparse_lambda=None,
               init_r=12, target_r=8, delta_t=10, orth_reg_weight=0.5, gate_init="ones",
               threshold_scale="lr", prox_variant="exact", label_smoothing=0.1)
    assert same_run(old, options(parse(["--method", "adalora"])))
    assert not same_run(old, options(parse(["--method", "adalora", "--target-r", "4"])))
    sora = dict(old, method="sora", init_r=12)
    assert same_run(sora, options(parse(["--method", "sora", "--r", "8", "--gate-lr", "1e-2"])))
    assert not same_run(sora, options(parse(["--method", "sora", "--gate-lr", "0.5"])))
    assert not same_run(dict(old, method="gone"), options(parse([])))


def _saved_lora(path, **kw):
    model = pelib.apply_lora(tiny(), ["query", "value"], r=4, alpha=8, **kw)
    for _, m in pelib.lora.lora_layers(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    pelib.save_adapter(model, path)
    return model.eval()


def test_loading_into_a_model_with_other_settings_is_refused(tmp_path):
    ours = _saved_lora(tmp_path / "ad")
    same = pelib.load_adapter(pelib.apply_lora(tiny(), ["query", "value"], r=4, alpha=8),
                              tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(ours(**batch()).logits, same(**batch()).logits)
    other_alpha = pelib.apply_lora(tiny(), ["query", "value"], r=4, alpha=32)
    with pytest.raises(ValueError, match="other settings.*lora_alpha"):
        pelib.load_adapter(other_alpha, tmp_path / "ad")
    merged = pelib.lora.merge(pelib.apply_lora(tiny(), ["query", "value"], r=4, alpha=8))
    with pytest.raises(ValueError, match="merged model"):
        pelib.load_adapter(merged, tmp_path / "ad")
    with pytest.raises(ValueError, match="already has LoRA layers"):
        pelib.apply_prefix(pelib.apply_lora(tiny(), ["query"], r=2))


def test_peft_alpha_pattern_is_honoured(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    theirs = get_peft_model(tiny(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                               target_modules=["key", "value"],
                                               alpha_pattern={"value": 32}))
    for n, p in theirs.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = pelib.load_adapter(tiny(), tmp_path / "peft").eval()
    scalings = {n.rsplit(".", 1)[-1]: m.scaling for n, m in pelib.lora.lora_layers(ours)}
    assert scalings == {"key": 2.0, "value": 8.0}
    with torch.no_grad():
        assert torch.equal(ours(**batch()).logits, theirs(**batch()).logits)


def test_broken_files_give_clear_errors(tmp_path):
    _saved_lora(tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_NAME).write_text('{"peft_type": "LORA", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        pelib.load_adapter(tiny(), tmp_path / "ad")
    _saved_lora(tmp_path / "ad")
    data = (tmp_path / "ad" / WEIGHTS_NAME).read_bytes()
    (tmp_path / "ad" / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        pelib.load_adapter(tiny(), tmp_path / "ad")
    _saved_lora(tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(dict(config, peft_type="ADALORA")))
    with pytest.raises(ValueError, match="to_lora"):
        pelib.load_adapter(tiny(), tmp_path / "ad")


def test_finetune_never_replaces_another_runs_results(tmp_path):
    common = ["finetune", "--tiny", "--train-limit", "16", "--eval-limit", "8", "--epochs", "1",
              "--r", "2", "--out", str(tmp_path), "--no-progress", "--name", "run"]
    main(common)
    first = (tmp_path / "run.json").read_text()
    with pytest.raises(SystemExit, match="holds a run with other options.*--overwrite"):
        main(common + ["--lr", "0.01"])
    assert (tmp_path / "run.json").read_text() == first
    main(common + ["--lr", "0.01", "--overwrite"])
    assert json.loads((tmp_path / "run.json").read_text())["args"]["lr"] == 0.01
    main(common + ["--lr", "0.01"])  # the same options again: rerunning is fine


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


def test_training_a_merged_adapter_is_refused():
    from pelib.train import TrainConfig, train

    model, tok = pelib.tiny_backbone("minilm", 77)
    pelib.lora.merge(pelib.apply_lora(model, ["query"], r=2))
    data = pelib.load_nlu("banking77", "train", limit=8)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        train(model, tok, data, data, TrainConfig(epochs=1, progress=False))


def test_head_only_floor_trains_the_head_alone(tmp_path):
    """`--method head` (the floor row): every backbone weight frozen, the head learns."""
    main(["finetune", "--tiny", "--method", "head", "--train-limit", "32", "--eval-limit", "8",
          "--epochs", "2", "--out", str(tmp_path), "--no-progress", "--name", "floor"])
    rec = json.loads((tmp_path / "floor.json").read_text())
    assert rec["trainable_params"] == 32 * 77 + 77  # the classifier of the 32-wide tiny model
    assert rec["config"]["lr"] == methods.METHODS["head"].lr
    model = pelib.inject.train_heads_only(tiny())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["classifier.weight", "classifier.bias"]
    with pytest.raises(ValueError, match="already has a head-only setup"):
        pelib.apply_lora(model, ["query"], r=2)


def test_device_precision_and_kernels_are_chosen_and_recorded(tmp_path):
    """On this CPU: fp32 unless --bf16, no kernels; a record says what ran. (The GPU choices,
    bf16 and pelib.patch for SmolLM2, are the same functions with CUDA present.)"""
    from pelib.finetune import parse, same_run, uses_bf16, uses_kernels

    main(["finetune", "--tiny", "--train-limit", "16", "--eval-limit", "8", "--epochs", "1",
          "--out", str(tmp_path), "--no-progress", "--name", "cpu", "--bf16"])
    rec = json.loads((tmp_path / "cpu.json").read_text())
    assert (rec["device"], rec["bf16"], rec["kernels"]) == ("cpu", True, False)
    assert not uses_bf16(parse(["--bf16", "--fp32"])) and not uses_kernels(parse(["--model", "smollm2"]))
    # the default follows the hardware: bf16 on a CPU with bf16 units, fp32 on one without
    cpu = parse(["--device", "cpu"])
    with mock.patch("pelib.finetune.cpu_has_fast_bf16", return_value=True):
        assert uses_bf16(cpu) and not uses_bf16(parse(["--device", "cpu", "--fp32"]))
    with mock.patch("pelib.finetune.cpu_has_fast_bf16", return_value=False):
        assert not uses_bf16(cpu) and uses_bf16(parse(["--device", "cpu", "--bf16"]))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            main(["finetune", "--tiny", "--device", "cuda", "--out", str(tmp_path)])
    old = {k: v for k, v in rec["args"].items() if k not in ("device", "fp32", "no_kernels")}
    assert same_run(old, rec["args"])  # a record from before these options: still the same run


def test_patch_on_a_llama_classifier_keeps_its_loss_and_its_outputs():
    from pelib.patch import patch, unpatch

    model = pelib.tiny_backbone("smollm2", 5, with_tokenizer=False)[0].eval()
    pelib.apply_lora(model, ["q_proj", "v_proj"], r=2)
    x = batch(model.config.vocab_size)
    labels = torch.tensor([0, 3, 4])
    with torch.no_grad():
        ref = model(**x, labels=labels)
        patch(model)
        got = model(**x, labels=labels)
        unpatch(model)
        back = model(**x, labels=labels)
    assert torch.allclose(got.logits, ref.logits, atol=1e-5) and torch.equal(back.logits, ref.logits)
    assert torch.allclose(got.loss, ref.loss, atol=1e-5)  # sequence classification loss, not causal
