"""Writing a file or directory so that nothing is ever half-written or left behind.

``StagedWrite(target)`` holds the target's writer lock (``flock`` on ``.<name>.lock`` beside it,
removed when the writer is done), so one writer at a time works on a target; whoever holds it first removes the temporaries
(``.<name>.tmp-*``) that earlier writers left when they were killed (SIGKILL, power loss): a
writer that is still running holds the lock, so its temporaries are never touched. The new
content is written into a temporary beside the target and renamed over it by ``publish``; on an
error the writer's own temporaries are removed. A writer that waited for the lock should look
whether the target is there now before writing it again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("tpllama")


class StagedWrite:
    """See the module docstring. Use as a context manager."""

    def __init__(self, target: str | os.PathLike, progress: bool = False):
        self.target = Path(target)
        self.progress = progress
        self.lock_path = self.target.with_name(f".{self.target.name}.lock")
        self._lock_fd: int | None = None
        self._temps: list[Path] = []

    @property
    def temp_prefix(self) -> str:
        return f".{self.target.name}.tmp-"

    def __enter__(self) -> "StagedWrite":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if not told and self.progress:
                    print(f"tpllama: waiting for another process writing {self.target}", file=sys.stderr)
                told = True
                time.sleep(0.2)
                continue
            if _same_file(fd, self.lock_path):
                break
            os.close(fd)  # the holder before us removed that lock file as it finished: lock the new one
        self._lock_fd = fd
        self.remove_stale()
        return self

    def remove_stale(self) -> list[Path]:
        """Remove temporaries of earlier writers of this target (they are dead: we hold the lock)."""
        removed = []
        for p in self.target.parent.glob(self.temp_prefix + "*"):
            _remove(p)
            removed.append(p)
        if removed:
            log.info("removed %d stale temporary file(s) of %s: %s", len(removed), self.target,
                     ", ".join(p.name for p in removed))
        return removed

    def temp_dir(self) -> Path:
        tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=self.temp_prefix))
        self._temps.append(tmp)
        return tmp

    def publish(self, tmp: Path) -> Path:
        """Put ``tmp`` (a temporary of ours, or a file inside one) in the target's place."""
        if self.target.is_dir() and not self.target.is_symlink():
            shutil.rmtree(self.target)
        os.replace(tmp, self.target)
        return self.target

    def __exit__(self, *exc) -> None:
        for tmp in self._temps:
            _remove(tmp)
        self._temps.clear()
        if self._lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)  # still ours: nothing is left beside the target
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
