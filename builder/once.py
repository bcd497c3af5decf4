"""A value computed once per work directory, however many processes of a build ask for it.

Under torchrun every rank starts at the same moment; under a Slurm array the
shards may start hours apart, or one at a time. Both are served by a lock file
created with ``O_CREAT | O_EXCL`` beside the result: the process that creates
it computes, writes the result atomically (temporary file, rename) and removes
the lock; every other process waits for the result and reuses it, and so does
every later restart while the result's key (what it was computed from) is
unchanged. A holder refreshes the lock's mtime every :data:`HEARTBEAT_S`
seconds; a lock whose holder is gone (a dead pid on this host, or no heartbeat
for :data:`STALE_AFTER_S` seconds, e.g. a killed job on another node) is
broken and the value computed again. The lock only saves work: the result is
deterministic and written atomically, so two processes that both compute it
(after a lock was broken twice at once) write the same bytes.

Every rank computing only its share and merging was the alternative: it
divides the work, but a rank then waits for shards that, in a Slurm array run
one at a time, start only after it ends.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> compute_once(folder, "answer", {"q": 1}, lambda: {"a": 42})
    ({'a': 42}, False)
    >>> compute_once(folder, "answer", {"q": 1}, lambda: {"a": 0})  # reused, not computed
    ({'a': 42}, True)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from d3mfmt.files import write_atomic

log = logging.getLogger("d3m-build")

HEARTBEAT_S = 10.0  # the holder touches its lock this often
STALE_AFTER_S = 120.0  # a lock untouched for this long has lost its holder
POLL_S = 0.2  # how often a waiting process looks for the result
MAX_RESULT_BYTES = 1 << 30


def compute_once(folder: Path, name: str, key: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``(value, reused)``: ``folder/NAME.json``'s value for ``key``, computed by ``compute()`` if absent.

    Args:
        key: what the value depends on (JSON); a stored value with another key is computed again.
        compute: returns a JSON-serialisable dict; its exceptions propagate (nothing is stored).
    """
    folder.mkdir(parents=True, exist_ok=True)
    result, lock = folder / f"{name}.json", folder / f"{name}.lock"
    key = json.loads(json.dumps(key))
    waiting_on = None
    while True:
        # 1. a stored value for this key: reuse it
        value = _read(result, key)
        if value is not None:
            return value, True
        # 2. the lock: compute and store the value
        token = _acquire(lock)
        if token is not None:
            return _compute_holding(lock, token, result, key, compute)
        # 3. another process holds it: wait, or break the lock of one that is gone
        holder = _holder(lock)
        if holder is not None and _stale(lock, holder):
            log.warning("breaking the stale lock %s (%s)", lock, _describe(holder))
            _break(lock)
            continue
        if holder is not None and holder.get("token") != waiting_on:
            waiting_on = holder.get("token")
            log.info("waiting for %s: %s computes it", result.name, _describe(holder))
        time.sleep(POLL_S)


def _compute_holding(lock: Path, token: str, result: Path, key: dict, compute) -> tuple[dict, bool]:
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
    beat.start()
    try:
        value = _read(result, key)  # stored by another process between our read and our lock
        if value is not None:
            return value, True
        value = compute()
        write_atomic(result, json.dumps({"key": key, "value": value}, sort_keys=True).encode())
        return value, False
    finally:
        stop.set()
        beat.join()
        if (_holder(lock) or {}).get("token") == token:
            lock.unlink(missing_ok=True)


def _read(path: Path, key: dict) -> dict | None:
    """The stored value for ``key``, or None (absent, another key, or damaged: then it is computed again)."""
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            return None
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); computing it again", path, str(exc)[:100])
        return None
    if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("value"), dict):
        return None
    return doc["value"]


def _acquire(lock: Path) -> str | None:
    """Create the lock (only one process can); its token, or None when it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    token = uuid.uuid4().hex
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": token}, f)
    return token


def _holder(lock: Path) -> dict | None:
    """Who holds the lock ({} while its holder is still writing it), or None when there is no lock."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(lock: Path, holder: dict) -> bool:
    """A dead holder on this host, or no heartbeat for STALE_AFTER_S."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    try:
        return time.time() - lock.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def _break(lock: Path) -> None:
    """Remove a stale lock: renamed first, so that of two breakers only one removes it."""
    aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    aside.unlink(missing_ok=True)


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(lock)
        except OSError:
            return


def _describe(holder: dict) -> str:
    if not holder:
        return "a process still writing the lock"
    return f"process {holder.get('pid')} on {str(holder.get('host'))[:100]}"
