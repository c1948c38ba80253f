"""Back-off for peers that keep failing: refuse a source address for a growing time.

One :class:`Backoff` per front door (DICOM associations, HTTP credentials). The door calls

* ``blocked(address)`` first, for every new connection or request: seconds the address is still
  refused for (its connection is then closed / answered at once, with no log line of its own), or 0;
* ``failure(address)`` when the address did something that must not be repeated freely (a rejected
  association, a failed TLS handshake, a PDU that breaks the rules, bad credentials);
* ``success(address)`` when it got in properly (the count starts again). The DICOM door calls it
  for an accepted association; the HTTP doors never do, as a credential's holder could otherwise
  interleave it with guesses at other credentials.

After ``threshold`` failures without a success the address is refused for ``initial_s``; the
first failure after a back-off starts the next one, twice as long, up to ``max_s`` (failures that
end while it is refused, e.g. connections it opened before, do not lengthen it). Failures are
forgotten ``forget_s`` after the last one. The log gets ONE line when an address starts a back-off (with how many attempts were refused
during its previous one), never one line per refused attempt. At most ``max_tracked`` addresses
are remembered (the least recently seen go first), so a flood of addresses costs bounded memory.
Thread-safe.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    failures: int = 0
    last_failure: float = 0.0
    until: float = 0.0  # refused until this clock time
    blocks: int = 0  # back-offs so far in this streak of failures
    refused: int = 0  # attempts refused during the current / last back-off, for the next log line


def source(address: str) -> str:
    """What a back-off counts against: the address, or for IPv6 its /64 (one host or site is
    usually given a whole /64, and could otherwise start afresh from each of its addresses)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


class Backoff:
    def __init__(self, what: str, threshold: int = 5, initial_s: float = 2.0, max_s: float = 300.0,
                 forget_s: float = 900.0, max_tracked: int = 4096,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger | None = None):
        if threshold < 1 or initial_s <= 0 or max_s < initial_s or max_tracked < 1:
            raise ValueError("Backoff needs threshold >= 1, 0 < initial_s <= max_s, max_tracked >= 1")
        self.what = what  # names the door in the log line: "DICOM associations", "HTTP credentials"
        self.threshold, self.initial_s, self.max_s = threshold, initial_s, max_s
        self.forget_s, self.max_tracked = max(forget_s, max_s), max_tracked
        self._clock = clock
        self._log = logger or log
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def blocked(self, address: str) -> float:
        """Seconds ``address`` is still refused for (0: let it in). A positive answer counts as one
        refused attempt: call it once per connection or request."""
        address = source(address)
        with self._lock:
            entry = self._entries.get(address)
            if entry is None:
                return 0.0
            left = entry.until - self._clock()
            if left <= 0:
                return 0.0
            entry.refused += 1
            return left

    def failure(self, address: str) -> float:
        """Record a failure; returns the back-off it started (seconds), 0 if none yet."""
        now = self._clock()
        address = source(address)
        with self._lock:
            entry = self._entries.pop(address, None)
            if entry is None or now - entry.last_failure > self.forget_s:
                entry = _Entry()
            self._entries[address] = entry  # most recently seen last
            while len(self._entries) > self.max_tracked:
                self._entries.popitem(last=False)
            entry.failures += 1
            entry.last_failure = now
            if entry.failures < self.threshold or entry.until > now:
                return 0.0
            seconds = min(self.max_s, self.initial_s * 2 ** min(entry.blocks, 32))
            entry.blocks += 1
            entry.until = now + seconds
            refused, entry.refused = entry.refused, 0
        earlier = f"; {refused} attempt(s) refused during its previous back-off" if refused else ""
        self._log.warning("%s: %s refused for %.0f s after %d failure(s) in a row%s",
                          self.what, address, seconds, entry.failures, earlier)
        return seconds

    def success(self, address: str) -> None:
        """The address got in properly: forget its failures."""
        with self._lock:
            self._entries.pop(source(address), None)

    def __len__(self) -> int:
        return len(self._entries)


LOG_WINDOW_S = 60.0


class LogWindow:
    """One log line per (host, kind) per window; the repeats are counted into the next line (a flood
    of refused attempts must not write a line each)."""

    def __init__(self, window_s: float = LOG_WINDOW_S, max_keys: int = 1024, logger: logging.Logger | None = None):
        self.window_s, self.max_keys = window_s, max_keys
        self._log = logger or log
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def warning(self, host: str, kind: str, message: str, *args: object) -> bool:
        """Log unless this (host, kind) was logged within the window; True when logged."""
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get((host, kind))
            if entry is not None and now - entry[0] < self.window_s:
                entry[1] += 1
                return False
            repeats = int(entry[1]) if entry else 0
            self._seen[(host, kind)] = [now, 0]
            self._seen.move_to_end((host, kind))
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
        more = f" ({repeats} more like it in the last {self.window_s:.0f} s)" if repeats else ""
        self._log.warning(message + more, *args)
        return True
