"""Outputs that appear whole or not at all, one writer per output, and disk errors as one line.

Every command that writes a directory (carve, finetune) writes it into a hidden temporary sibling
and renames it into place at the end: a process killed at any point leaves either nothing or the
previous directory, never one that looks complete. A lock file beside the output lets only one
process write it at a time; a second one fails at once instead of racing the first to the rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import CheckpointError

# errno -> what to tell the user; anything else is reported with its strerror.
_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device: free space or choose another --out",
    errno.EDQUOT: "disk quota exceeded: free space or choose another --out",
    errno.EACCES: "permission denied: choose a writable --out",
    errno.EPERM: "permission denied: choose a writable --out",
    errno.EROFS: "the file system is read-only: choose a writable --out",
}


def disk_error(out: Path, err: OSError) -> CheckpointError:
    """A one-line CheckpointError for an OSError met while writing `out`."""
    why = _DISK_ERRORS.get(err.errno, f"{err.strerror or err}: check the path and the disk")
    return CheckpointError(f"cannot write {out}: {why}")


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty directory (or a file) unless asked to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file: choose a directory path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out} already exists and is not empty: choose another --out or pass --overwrite"
        )
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise CheckpointError(f"--out {out}: {parent} is a file, not a directory: choose another path")


def check_not_input(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an --out that is an input or holds one: replacing it would destroy the input."""
    target = Path(out).expanduser().resolve()
    for ref in inputs:
        if ref is None or not Path(ref).expanduser().exists():
            continue
        source = Path(ref).expanduser().resolve()
        if source == target or target in source.parents:
            raise CheckpointError(
                f"--out {out} is the input {ref} (or holds it): writing there would replace "
                "the input; choose another --out"
            )


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            return parent
    return Path("/")


def _make_temp_dir(parent: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent))


def probe_writable(out: Path) -> None:
    """Create and remove a temporary sibling of `out`: fail before minutes of work, not after."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _make_temp_dir(out.parent, out.name).rmdir()
    except OSError as err:
        raise disk_error(out, err) from None


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool):
    """Yield a temporary directory that becomes `out` only if the block completes.

    An OSError inside the block (a full disk, a permission lost) becomes a CheckpointError; the
    temporary directory is removed in every case, and `out` is left as it was.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp_dir(out.parent, out.name)
    except OSError as err:
        raise disk_error(out, err) from None
    try:
        try:
            yield tmp
            _fsync_tree(tmp)  # the data reach the disk before the rename makes them visible
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; a plain mkdir would not
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except OSError as err:
            raise disk_error(out, err) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def lock_path(out: Path) -> Path:
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on `out` for the block; CheckpointError if another process has it.

    flock is released by the kernel when the process dies, so a killed run never leaves a
    stale lock. The file is removed on the way out; a writer that opened it just before the
    removal notices that its file is no longer the one at the path and tries again.
    """
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise disk_error(Path(out), err) from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise disk_error(Path(out), err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"another cmoe process is writing {out} (lock {path}): wait for it to finish or "
                "choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file that its owner removed meanwhile: lock the new one
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        remove_stale_partials(Path(out))
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def remove_stale_partials(out: Path) -> None:
    """Temporary directories of `out` left by killed runs. Called with the lock held: only the
    lock holder writes them, so any that exist belong to a process that is gone."""
    out = Path(out).expanduser().absolute()
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def holds_output_lock(fn: Callable) -> Callable:
    """Run `fn` holding output_lock on its `out` argument."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # Under `accelerate launch`/torchrun every rank runs the command and only rank 0
        # writes: it alone takes the lock (the others would find it held and stop).
        if os.environ.get("RANK", "0") not in ("", "0"):
            return fn(*args, **kwargs)
        out = signature.bind(*args, **kwargs).arguments["out"]
        with output_lock(Path(out)):
            return fn(*args, **kwargs)

    return wrapper


def check_output_file(path: Path, flag: str) -> None:
    """A results file (--json, --profile) can be written where it is asked for."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{flag} {path} is a directory: name a file")
    if not path.parent.is_dir():
        raise CheckpointError(f"{flag} {path}: {path.parent} is not a directory: create it first")


def write_text_file(path: Path, text: str, flag: str) -> None:
    """Write a results file whole (temporary sibling, then rename), or fail in one line."""
    path = Path(path)
    check_output_file(path, flag)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise disk_error(path, err) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as err:
        raise disk_error(path, err) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
