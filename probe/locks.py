"""An exclusive lock on an output directory, so two builds never write into one directory at once.

The lock is ``fcntl.flock`` on ``DIR/.lock``: the operating system releases it when the holder exits,
however it dies (kill -9 included), so a stale lock never blocks a later run. The file keeps the
holder's pid and what it is doing, for the refusal message, and is removed when the holder finishes
(a killed holder leaves it behind, unlocked and harmless), with the directory itself when the lock made it
and nothing else was written there. Known gap: a process that opened the file
just before the holder removed it may lock the removed file while a newcomer locks a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from probe.errors import SteerscopeError

LOCK = ".lock"


@contextlib.contextmanager
def dir_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock of directory ``path`` (created if needed) while ``what`` (e.g. "cache build") runs; a
    second holder gets a SteerscopeError naming the first one."""
    path = Path(path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        f = open(path / LOCK, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    except (NotADirectoryError, FileExistsError) as e:
        raise SteerscopeError(f"cannot use {path} as a directory: a file is in the way ({e.filename})") from e
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "{}"
            with contextlib.suppress(json.JSONDecodeError):
                h = json.loads(holder)
                holder = f"a {h.get('what', 'job')} (pid {h.get('pid')}, since {h.get('since')})"
            raise SteerscopeError(f"{path} is in use by {holder}; wait for it to finish or choose another "
                                  "directory") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"what": what, "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        yield
    finally:
        if f.tell():  # we hold it (we wrote our record): remove the file so the directory stays tidy, then release
            with contextlib.suppress(OSError):
                os.unlink(path / LOCK)
            if created:  # a run that failed before writing anything leaves no empty directory behind
                with contextlib.suppress(OSError):
                    path.rmdir()
        f.close()  # closing releases the lock
