"""The method table and the shape around it: the CLI reads the table, layers import downwards,
adapter files load through one loader that refuses what does not fit."""
import ast
import json
from pathlib import Path

import pytest
import torch

import pelib
from pelib import methods
from pelib.__main__ import main
from pelib.io import CONFIG_NAME, WEIGHTS_NAME

PELIB = Path(pelib.__file__).resolve().parent
# Each module may import only modules of a lower rank (its own package's modules excepted).
RANK = {"files": 0, "metrics": 0, "data": 0, "backbone": 0, "measure": 0, "kernels": 0,
        "inject": 1, "io": 1, "lora": 2, "adapter": 2, "prefix": 2, "adalora": 3, "sora": 3,
        "quant": 3, "train": 4, "patch": 4, "peers": 5, "methods": 6, "finetune": 7, "bench": 7,
        "compare": 8, "__main__": 9, "__init__": 10}
# kernels/ is a leaf, but fused QLoRA needs quant's state type and op (imported lazily there).
ALLOWED = {("kernels", "quant")}


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
    def head_only(model, args, run):
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier"))
        return model, []

    monkeypatch.setitem(methods.METHODS, "probe", methods.Method(
        lr=7e-3, tag=lambda a: "-head", build={"pelib": head_only}, help="the head alone"))
    main(["finetune", "--tiny", "--method", "probe", "--train-limit", "32", "--eval-limit", "16",
          "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    rec = json.loads((tmp_path / "minilm-tiny_banking77_probe-head_pelib_s0.json").read_text())
    assert rec["config"]["lr"] == 7e-3
    assert rec["trainable_params"] == 32 * 77 + 77  # the 77-way head of a 32-wide model


@pytest.mark.parametrize("argv,message", [
    (["--method", "lora", "--init-r", "4"], "--init-r is an option of --method adalora"),
    (["--method", "sora", "--impl", "peft"], "--impl peft is only for --method lora, qlora"),
    (["--method", "lora", "--lr", "0"], "lr must be > 0"),
    (["--method", "lora", "--name", "../x"], "plain file stem"),
    (["--method", "lora", "--dropout", "1.5"], "dropout must be in"),
    (["--method", "lora", "--alpha", "nan"], "alpha must be a finite number"),
])
def test_cli_options_that_do_not_fit_are_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["finetune", "--tiny", "--train-limit", "8", "--out", str(tmp_path), *argv])


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
