"""Files: written whole or not at all, into folders we checked we can write.

Every file pelib writes (results, checkpoints, adapters, figures) goes through `atomic_write`:
the bytes go to a temporary file in the same folder, are flushed to disk, and the file is
renamed over the target. A rename within one file system is atomic, so a reader (or a run
killed half-way) sees the old file or the new one, never half of one. The temporary's name
carries the writer's process id; a temporary left by a process that no longer runs (killed
with SIGKILL, say) is removed by the next write of the same file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call write(tmp_path), then rename tmp_path to path (atomic on one file system)."""
    path = Path(path)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create `path` if needed and check that we can write there (before hours of training)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pelib-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write results to {out}/ ({e.strerror}); pass {flag} DIR with a "
                         "folder you can write to") from None
    return out
