"""Ctrl-C during a stage: one line saying what was kept and how to go on, never a traceback."""

from __future__ import annotations


class Interrupted(Exception):
    """Ctrl-C during a stage, with what was kept and how to continue (one line, no traceback)."""


_ctrl_c = False


def on_ctrl_c(signum=None, frame=None):
    """The CLI's SIGINT handler: KeyboardInterrupt, as Python's own, and a flag that ``stop_if_ctrl_c`` reads,
    because Python drops an exception raised while a finalizer runs and the stage would go on to the end."""
    global _ctrl_c
    _ctrl_c = True
    raise KeyboardInterrupt


def stop_if_ctrl_c() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came and its exception got lost (called between steps and chunks)."""
    if _ctrl_c:
        raise KeyboardInterrupt
