"""The pins live in pyproject.toml; environment.yml (for conda users) must list the same."""
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def pins(lines):
    return {re.split("==", s)[0].lower(): s.split("==")[1] for s in lines if "==" in s}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    assert all("==" in d for d in project["dependencies"]), "every dependency is pinned exactly"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(pip_section) == ours
    assert ours["torch"] == "2.13.0"
    text = (ROOT / "environment.yml").read_text()
    for pkg in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pelib"]["model-packages"]:
        assert pkg in text, f"environment.yml should tell conda users to install {pkg} --no-deps"


@pytest.mark.slow  # a subprocess
def test_offline_switches_are_set():
    """`import pelib` itself turns the hub off (conftest sets the same variables, so the check runs
    in a fresh interpreter with every HF_*/TRANSFORMERS_* variable removed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    r = subprocess.run([sys.executable, "-c", "import pelib, os; print(os.environ.get('HF_HUB_OFFLINE'), "
                        "os.environ.get('TRANSFORMERS_OFFLINE'))"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"], r.stdout
