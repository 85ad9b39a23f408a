"""The data ships inside the package: an installed pelib (not a clone) reads it, and a folder of
the user's own gets errors about that folder, never advice to restore pelib's files."""
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import pelib.data as data
from pelib.data import load_nlu

ROOT = Path(__file__).resolve().parent.parent


def test_a_missing_folder_of_the_users_own_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_dir='.*nowhere' has no banking77/train\.tsv") as e:
        load_nlu("banking77", "train", data_dir=tmp_path / "nowhere")
    assert "git" not in str(e.value) and "reinstall" not in str(e.value)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "banking77").mkdir()
    (tmp_path / "banking77" / "train.tsv").write_bytes("text\tlabel\ncaf\xe9\tx\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.tsv: byte \d+ is not UTF-8.*save the file as UTF-8"):
        load_nlu("banking77", "train", data_dir=tmp_path)


def test_a_missing_shipped_file_says_reinstall(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)  # an install that lost its data files
    with pytest.raises(FileNotFoundError, match="banking77/train.tsv is missing.*reinstall pelib") as e:
        load_nlu("banking77", "train")
    assert "git" not in str(e.value)


def test_the_shipped_data_is_package_data():
    assert Path(str(data.DATA_DIR)) == ROOT / "pelib" / "_data"
    assert not (ROOT / "data").exists()


@pytest.mark.slow  # builds a wheel and reads the data from it in a subprocess
def test_the_wheel_carries_the_data(tmp_path):
    """Build the wheel from a copy of the sources, unpack it, and load Banking77 from it with the
    working directory elsewhere and only the unpacked wheel (plus the venv's own packages) to
    import pelib from."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "pelib", src / "pelib", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("pelib-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {f"pelib/_data/{d}/{s}.tsv" for d in ("banking77", "clinc150")
            for s in ("train", "dev", "test")} | {"pelib/_data/README.md"} <= names
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", "import pelib; from pelib.data import load_nlu; "
                        "print(pelib.__file__); print(len(load_nlu('banking77', 'train').texts))"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    where, rows = r.stdout.split()
    assert Path(where).is_relative_to(tmp_path / "site"), where  # not the clone's pelib
    assert int(rows) == 9003
