"""Files: written whole or not at all, never through a link, into folders we checked we can write.

Every file pelib writes (records, checkpoints, adapters, figures, tables) goes through
`atomic_write`: the writer gets a path inside a fresh private folder beside the target
(created by mkdir, which never follows a link and fails if the name exists; mode 0700, so no
one else can put a link inside), the bytes are flushed to disk, and the file is renamed over the
target. A rename within one file system is atomic, so a reader (or a run killed half-way) sees
the old file or the new one, never half of one; and a rename replaces a link at the target's
name instead of writing through it. The temporary folder's name carries the writer's process
id; one left by a process that no longer runs (killed with SIGKILL, say) is removed by the next
write of the same file.

Lock files (`open_lock`) are opened with O_NOFOLLOW and never truncated; the write probe of
`writable_dir` is a fresh file of its own (O_CREAT | O_EXCL | O_NOFOLLOW, a unique name), so
two processes probing one folder do not meet.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call write(tmp_path), then rename tmp_path onto path (atomic on one file system)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise ValueError(f"{path} is a folder, where pelib writes a file; move the folder away or "
                         "choose another name")
    _remove_stale_temporaries(path)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        tmp = folder / path.name
        write(str(tmp))
        if not stat.S_ISREG(os.lstat(tmp).st_mode):  # the writer's own file, not a link it made
            raise ValueError(f"writing {path} did not produce a plain file")
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a text file (UTF-8)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)  # rmtree never follows links inside
            else:
                tmp.unlink(missing_ok=True)              # a file or a link: the name goes, not its target


def open_lock(path: str | os.PathLike) -> BinaryIO:
    """Open (creating if needed) a lock file for fcntl.flock: never through a link, never truncated.

    A link at the lock's name is refused (a lock is pelib's own file); an existing plain file is
    only opened for reading, so a file hard-linked there is not changed either.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link where pelib keeps its lock file; remove the "
                             "link") from None
        raise ValueError(f"cannot create the lock file {path} ({e.strerror}); pass --out DIR with a "
                         "folder you can write to") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a plain file where pelib keeps its lock file; remove it")
    return os.fdopen(fd, "rb")


def writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create `path` if needed and check that we can write there (before hours of training)."""
    if os.fspath(path).strip() == "":
        raise ValueError(f"{flag} is empty; pass {flag} DIR with a folder to write to ('.' for the "
                         "current folder)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is not a folder; pass {flag} DIR with a folder to write to")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".pelib-write-test.")  # O_EXCL | O_NOFOLLOW
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write results to {out}/ ({e.strerror}); pass {flag} DIR with a "
                         "folder you can write to") from None
    return out
