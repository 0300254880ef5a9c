"""Build output folders: one build at a time per folder, `--force` only over an earlier build, and a swap
that never leaves the folder missing or half-written.

A build is written to `.NAME.tmp-PID` beside `--out` (holding MARKER from its first moment), under an
exclusive lock on `.NAME.lock`, and swapped in at the end. Leftovers of a killed build (a temporary folder, or
the previous build set aside by the two-rename fallback) are restored or removed by the next build of that
folder, under the same lock.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..console import info
from ..errors import DeployError

MARKER = ".edge-deploy-build"  # written into every build folder: what --force may replace


def is_build(path: Path) -> bool:
    """A folder this tool wrote: it has MARKER, or (builds before MARKER existed) an edge-deploy report.json."""
    if not path.is_dir():
        return False
    if (path / MARKER).is_file():
        return True
    try:
        return json.loads((path / "report.json").read_text())["tool"]["name"] == "edge-deploy"
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextmanager
def replacing(out: Path, force: bool) -> Iterator[Path]:
    """Yield a new temporary folder for a build of `out`; when the block ends without an exception, it becomes
    `out` (replacing an earlier build only with `force`). On any exception it is removed and `out` is untouched."""
    out = out.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with lock(out):
            _recover(out)
            if out.exists() or out.is_symlink():
                if not force:
                    raise DeployError(f"output directory {out} exists; pass --force to replace it")
                if out.is_symlink() or not is_build(out):
                    raise DeployError(f"refusing to replace {out}: it is not a folder written by `deploy build` "
                                      f"(no {MARKER} or edge-deploy report.json in it); choose another --out")  # fmt: skip
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
            tmp.mkdir()
            try:
                (tmp / MARKER).write_text(f"edge-deploy build of {out.name}\n")
                yield tmp
                _swap_in(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as err:  # read-only or full file system, no permission, /proc: one line, not a traceback
        where = f" ({err.filename})" if err.filename else ""
        raise DeployError(f"build of {out} failed: {err.strerror or err}{where}") from None


@contextmanager
def lock(out: Path) -> Iterator[None]:
    """An exclusive, non-blocking flock on `.NAME.lock`: a second build of the same folder fails at once."""
    import fcntl  # POSIX only: the build machines and edge targets this tool serves are Linux

    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise DeployError(f"another build is writing {out} ({holder}); wait for it or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and flock: lock the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking, so a waiting process re-checks the inode
        os.close(fd)


def _recover(out: Path) -> None:
    """Restore a previous build that a killed swap left aside, and remove killed builds' temporary folders.
    Only folders with this tool's names and MARKER are touched; the caller holds the lock."""
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not is_build(old):
            continue
        if out.exists():
            shutil.rmtree(old)
        else:
            old.rename(out)
            info(f"restored the previous build {out} (an interrupted build had set it aside)")
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        if tmp.is_dir() and (tmp / MARKER).is_file():
            shutil.rmtree(tmp)
            info(f"removed {tmp.name}, left by an interrupted build")


def _swap_in(new: Path, dest: Path) -> None:
    """Make `new` the folder `dest`. An existing `dest` is exchanged with it in one atomic rename where the
    file system can, else set aside, replaced, and restored if the second rename fails."""
    if not dest.exists():
        new.rename(dest)
        return
    if _exchange(new, dest):  # `new` now holds the previous build
        shutil.rmtree(new, ignore_errors=True)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE) (glibc 2.28+; Python's os has no
    binding for it). False where the platform or file system does not support it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
