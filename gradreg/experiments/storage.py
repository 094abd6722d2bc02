"""The runner's files on disk: atomic writes, verified reads, and per-run claims for concurrent processes.

* Every file is written to a temporary file of a name unique to the writer, in the same folder, then moved onto
  its name with ``os.replace`` (atomic on POSIX and Windows): a reader sees the old file or the new one, never half
  of one, and two writers never share a temporary file.
* A file that cannot be read back as what it claims to be (garbage, empty, truncated, written for another run)
  raises :class:`StoredFileError`, which names the file and what to do: delete it (the run is trained again), or
  let the runner do that (``run(..., retrain_corrupt=True)``, ``--retrain-corrupt``).
* ``<run_id>.claim``, created with ``O_CREAT | O_EXCL`` (so by one process only), says which process (pid, host)
  trains the run. A claim left by a process that died (its pid no longer exists on this host) is stale and taken
  over; a takeover happens under a lock of the folder (``fcntl.flock`` where available) and re-checks the claim,
  so two processes never take over the same claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradreg.runtime import atomic_write

#: What to do with a bad stored file; every :class:`StoredFileError` message ends with it.
#: An unreadable claim younger than this is taken to be in the middle of being written.
UNREADABLE_STALE_S = 30.0
REMEDY = ("delete it to train this run again, or rerun with --retrain-corrupt "
          "(run(..., retrain_corrupt=True)), which does that")


class StoredFileError(ValueError):
    """A stored result or checkpoint that is corrupt, truncated, empty or belongs to another run."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}; {REMEDY}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object stored at ``path``, or a :class:`StoredFileError` saying what is wrong with the file."""
    try:
        text = path.read_bytes().decode()
    except UnicodeDecodeError:
        raise StoredFileError(path, "is not text (overwritten with binary data?)") from None
    if not text.strip():
        raise StoredFileError(path, "is empty (a run cut off while writing by an older gradreg, or emptied)")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoredFileError(path, f"is not valid JSON ({exc.msg} at character {exc.pos}: truncated or "
                                    "overwritten?)") from None
    if not isinstance(values, dict):
        raise StoredFileError(path, f"holds a JSON {type(values).__name__}, not a run's result")
    return values


# ------------------------------------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """Who trains a run: a process (pid) on a host; ``token`` tells this claim from a later one of the same pid."""

    pid: int
    host: str
    token: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True  # cannot tell (e.g. Windows): assume it runs
    return True


def read_claim(path: Path) -> Claim | None:
    """The claim at ``path``; None if there is none. An unreadable one (being written, or cut off while written)
    reads as pid 0: stale once it is :data:`UNREADABLE_STALE_S` seconds old."""
    try:
        values = json.loads(path.read_text())
        return Claim(int(values["pid"]), str(values["host"]), str(values["token"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        return Claim(0, socket.gethostname(), "")


def is_stale(claim: Claim, path: Path) -> bool:
    """Whether ``claim`` (read from ``path``) was left by a process that no longer runs (decidable on this host)."""
    if claim.pid <= 0:
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime > UNREADABLE_STALE_S
        return True
    return claim.host == socket.gethostname() and not _alive(claim.pid)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: takeovers are not serialized
        yield
        return
    with open(folder / ".claims.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _create(path: Path, claim: Claim) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        json.dump({"pid": claim.pid, "host": claim.host, "token": claim.token}, file)
    return True


def try_claim(path: Path) -> tuple[Claim | None, Claim | None]:
    """Claim a run: ``(mine, None)`` if this process now holds ``path`` (a stale claim is taken over, and then
    ``(mine, stale)``), ``(None, holder)`` if a live process holds it."""
    mine = Claim(os.getpid(), socket.gethostname(), uuid.uuid4().hex)
    if _create(path, mine):
        return mine, None
    with _folder_lock(path.parent):
        holder = read_claim(path)
        if holder is None:
            return (mine, None) if _create(path, mine) else (None, read_claim(path))
        if not is_stale(holder, path):
            return None, holder
        path.unlink(missing_ok=True)
        return (mine, holder) if _create(path, mine) else (None, read_claim(path))


def release(path: Path, claim: Claim) -> None:
    """Remove ``path`` if it still holds ``claim``."""
    if read_claim(path) == claim:
        path.unlink(missing_ok=True)
