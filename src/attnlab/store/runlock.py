"""One writer per run directory: an operating-system lock on ``RUN/.lock``.

Two trainings started into the same ``--out`` would mix their logs, checkpoints and averages. The
first takes an exclusive ``flock`` on ``RUN/.lock`` and writes its process id and command there; a
second writer is refused with a message that names the first. The kernel releases the lock when its
process ends, however it ends (even SIGKILL), so a stale lock of a dead process never blocks a run:
the file may stay behind, but it holds no lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

from ..errors import RunDirectoryError

__all__ = ["RunLock"]

LOCK_NAME = ".lock"


class RunLock:
    """``with RunLock(run_dir):`` holds the run's lock for the block (or raises RunDirectoryError)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirectoryError(
                f"{self.run_dir} is being written by {holder}; wait for it to finish, or pick another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:300]
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
