"""The pins live in pyproject.toml; environment.yml (for conda users) must list the same."""
import re
import tomllib
from pathlib import Path

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
