"""One writer per output folder, and no output inside an input.

``write_lock(out)`` holds an exclusive ``flock`` on ``.<name>.rho1-lock`` beside ``out`` while a stage writes
it (prepare and export move a finished ``.partial`` folder into place, so the lock cannot live inside). The
operating system releases an ``flock`` when its process dies, however it dies, so a lock left by a killed
run is simply taken over by the next one; the file is removed when the writer finishes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, no lock (rho1's tests and clusters are Linux)
    fcntl = None


def lock_path(out: str | Path) -> Path:
    out = Path(out).resolve()  # one lock for every spelling of the folder, links included
    return out.with_name(f".{out.name}.rho1-lock")


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


@contextlib.contextmanager
def write_lock(out: str | Path, what: str = "rho1", enabled: bool = True):
    """Hold the lock of ``out`` for the ``with`` block, or one sentence when another process holds it.
    ``enabled=False`` (the other processes of one distributed job) does nothing."""
    if not enabled or fcntl is None:
        yield
        return
    path = lock_path(out)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"cannot take the write lock of {out}: {path} cannot be created "
                             f"({(err.strerror or str(err)).lower()}); choose an --out in a folder you can write "
                             "to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"{out} is being written by another process{_holder(path)}; wait for it to finish "
                             "(or stop it), or choose another --out") from None
        try:  # the file we locked may have been removed by a writer finishing meanwhile: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message of the next writer (a full disk: not)
            os.ftruncate(fd, 0)
            os.write(fd, f"{what}, pid {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or lies under it (symbolic links resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_not_inside(out: str | Path, inputs, flag: str = "--out") -> None:
    """Refuse an output folder inside (or equal to) the folder of an input: rebuilding that input (e.g.
    `rho1 prepare --overwrite`) or removing it would take the output with it. ``inputs``: (option, path)
    pairs, or a dict of them."""
    for name, value in inputs.items() if isinstance(inputs, dict) else inputs:
        if not value or not Path(value).is_dir():
            continue
        if is_inside(out, value):
            raise ValueError(f"{flag} {out} is inside {name} {value}; write outputs beside their inputs, not into "
                             f"them (choose another {flag})")
