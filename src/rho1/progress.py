"""Progress bars: tqdm on a terminal; one plain line at most every 30 s when stderr is a file or a pipe
(CI, nohup, tee), instead of thousands of carriage-return updates."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between lines when stderr is not a terminal


class _Lines:
    """A stream that drops the bare newlines tqdm writes when a bar closes."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class _LineBar(tqdm):
    """tqdm that writes each refresh as its own line."""

    def display(self, msg=None, pos=None):
        text = (msg or self.__str__()).strip()
        if text:
            self.fp.write(text + "\n")
            self.fp.flush()
        return True


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, or lines every 30 s when stderr is not a terminal."""
    if kwargs.get("disable") or sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return _LineBar(iterable, file=_Lines(kwargs.pop("file", sys.stderr)), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, miniters=1, ascii=True,
                    dynamic_ncols=False, ncols=100, **kwargs)
