"""Progress of long work (``srnode process``, ``train``, ``eval``): a tqdm bar on a terminal, else one
log line every ``every_s`` seconds and one at the end, so a log file shows where the work stands."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm


class Progress:
    def __init__(self, what: str, total: int | None = None, unit: str = "it", *, every_s: float = 30.0,
                 enabled: bool = True, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit, self.every_s, self.enabled = what, total, unit, every_s, enabled
        self.stream = stream or sys.stderr
        self.done, self.note = 0, ""
        self.clock = clock
        self.start = self.last = clock()
        self._printed: int | None = None
        self.bar = (tqdm(total=total, desc=what, unit=unit, file=self.stream, dynamic_ncols=True)
                    if enabled and self.stream.isatty() else None)

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        """``done`` of ``total`` (which may change, e.g. once a pipeline knows its output size)."""
        self.done, self.total, self.note = done, self.total if total is None else total, note
        if self.bar is not None:
            self.bar.total, self.bar.n = self.total, done
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.refresh()
        elif self.enabled and (self.clock() - self.last >= self.every_s or done == self.total):
            self._line()

    def write(self, text: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self._printed != self.done:
            self._line()

    def _line(self) -> None:
        self.last = self.clock()
        elapsed = self.last - self.start
        of = f"/{self.total}" if self.total else ""
        eta = (f", eta {elapsed / self.done * (self.total - self.done):.0f}s"
               if self.total and 0 < self.done < self.total else "")
        note = f"  {self.note}" if self.note else ""
        print(f"{self.what}: {self.done}{of} {self.unit}{note}  {elapsed:.0f}s{eta}", file=self.stream, flush=True)
        self._printed = self.done
