"""Layers import downwards: each pelib module imports only modules of a lower rank."""
import ast
from pathlib import Path

import pelib

PELIB = Path(pelib.__file__).resolve().parent
# Each module may import only modules of a lower rank (its own package's modules excepted).
RANK = {"files": 0, "recipe": 0, "dispatch": 0, "metrics": 0, "data": 0, "classifier": 0,
        "measure": 0, "kernels": 0, "probe": 0, "distributed": 0, "batching": 0, "schedule": 0,
        "proximal": 0,
        "linear_ce": 1, "backbone": 1, "inject": 1, "io": 1, "evaluation": 1, "checkpoint": 1, "settings": 1,
        "lora": 2, "adapter": 2, "prefix": 2, "hooks": 2, "optim": 2, "sft": 2,
        "svd_adaptation": 3, "gated_lora": 3, "dora": 3, "quant": 3,
        "rank_allocation": 4, "sora": 4, "train": 4, "adalora": 5, "peers": 5, "sft_train": 5, "methods": 6,
        "patch": 7, "options": 7, "report": 7, "runs": 8, "finetune": 9, "bench": 9,
        "compare": 10, "__main__": 11, "__init__": 12}
# No exceptions: kernels/ are leaves (a 4-bit W's dequantisers are handed to the LoRA kernel
# by pelib.quant, which imports kernels, not the other way round).
ALLOWED: set[tuple[str, str]] = set()


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
