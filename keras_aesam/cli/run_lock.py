"""One process at a time in a run directory or a bench folder: the lock file ``.keras-aesam-lock``.

``keras-aesam train`` (the chief) and ``keras-aesam bench`` hold the lock of
their ``--output`` folder from before they check or delete anything in it until
they exit. The lock is an ``flock`` on the file, which the operating system
releases when its process ends, however it ends; the file records who holds it
(pid, host, command, start time) for the messages:

* a second process is refused (:class:`Locked`, exit code :data:`LOCKED_EXIT`)
  with the holder's pid and host, before it looks at the folder's files, so
  ``--overwrite`` never deletes a folder another process trains in;
* a lock file left by a killed process on this host (no process holds the
  ``flock`` any more) is stale: it is taken over, saying whose it was;
* a lock file written on another host is refused while it is there (that host's
  processes cannot be checked from here); delete it once that run is gone.

A process that ends normally removes the file. On file systems without
``flock`` the lock falls back to checking whether the recorded pid is alive.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

__all__ = ["LOCKED_EXIT", "LOCK_FILE", "Locked", "RunLock", "holder"]

#: The lock's file name inside the folder it guards.
LOCK_FILE = ".keras-aesam-lock"
#: Exit code of a command refused because another process holds its folder (sysexits' EX_TEMPFAIL).
LOCKED_EXIT = 75


class Locked(Exception):
    """Another live process holds the folder's lock."""


def holder(folder) -> Optional[dict]:
    """Who holds (or last held) ``folder``'s lock, as recorded in the file; None if there is none."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None


def _describe(info: Optional[dict]) -> str:
    if not info:
        return "a process whose record is unreadable"
    return (f"{info.get('command', 'keras-aesam')} (pid {info.get('pid')} on host {info.get('host')}, "
            f"since {info.get('started', '?')})")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    except (TypeError, ValueError, OverflowError):
        return False
    return True


class RunLock:
    """The held lock of one folder; :meth:`release` (or the process's end) frees it."""

    def __init__(self, folder: Path, fd: int, info: dict, took_over: Optional[dict]):
        self.folder, self._fd, self.info, self.took_over = folder, fd, info, took_over

    @classmethod
    def acquire(cls, folder, command: str, *, stream=None) -> "RunLock":
        """Creates ``folder`` if needed and takes its lock; Locked when a live process holds it.

        A stale lock (its process gone) is taken over with a line on ``stream``
        (default stderr) naming its former holder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Locked(f"{str(folder)!r} is in use by {_describe(holder(folder))}; wait for it to end, "
                             "or choose another --output") from None
            except OSError as err:  # no flock on this file system: the recorded pid decides
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                info = holder(folder)
                if info and info.get("host") == socket.gethostname() and _pid_alive(info.get("pid")) \
                        and info.get("pid") != os.getpid():
                    os.close(fd)
                    raise Locked(f"{str(folder)!r} is in use by {_describe(info)}; wait for it to end, "
                                 "or choose another --output") from None
            try:  # the file we locked must still be the folder's (a releasing process unlinks it)
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = holder(folder)
        if previous and previous.get("host") != socket.gethostname():
            os.close(fd)
            raise Locked(f"{str(folder)!r} holds the lock of {_describe(previous)}, another host, whose "
                         f"process cannot be checked from here; if that run has ended, delete "
                         f"{str(path)!r} and try again")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        if previous:
            print(f"keras-aesam: took over the stale lock of {folder}: its holder, {_describe(previous)}, "
                  "no longer runs (killed or crashed)", file=stream or sys.stderr, flush=True)
        return cls(folder, fd, info, previous or None)

    def release(self) -> None:
        """Removes the lock file and frees the lock (once; later calls do nothing)."""
        if self._fd is None:
            return
        path = self.folder / LOCK_FILE
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(path)):
                path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
