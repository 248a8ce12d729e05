"""Progress of a long data preparation, readable on a terminal and in a stage's log file alike.

On a terminal one line is redrawn every second; anywhere else (a NeMo-Run or Slurm log) a plain
line is printed every `interval` seconds, so that a log shows the run advancing and when it will end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, label: str, total_bytes: int, interval: float | None = None, stream: TextIO | None = None,
                 enabled: bool = True):
        self.label, self.total = label, total_bytes
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (1.0 if self.tty else 30.0)
        self.enabled = enabled
        self.started = self.last = None  # set by the first record: rates exclude start-up (imports, workers)
        self.drawn = False

    def update(self, read: int, kept: int, rejected: int, done_bytes: int) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = self.last = now
        if not self.enabled or now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.started
        rate = done_bytes / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - done_bytes) / rate) if rate > 0 else "?"
        share = 100 * done_bytes / self.total if self.total else 100.0
        line = (f"{self.label}: {read:,} read, {kept:,} kept, {rejected:,} rejected, {done_bytes / 1e6:,.1f} of "
                f"{self.total / 1e6:,.1f} MB ({share:.0f}%), {rate / 1e6:.2f} MB/s, elapsed {_duration(elapsed)}, "
                f"ETA {eta}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:  # end the redrawn line so that what follows starts on its own
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
