"""One format for every log line the node's processes write (the node, its workers, pynetdicom's
and Celery's loggers): control characters are escaped, so a newline in a peer's AE title, a UID or
an HTTP header cannot start a forged line. A record's first line is its escaped message; the lines
of a traceback that follow are indented, so no line a sender influences can begin like a record.
"""
from __future__ import annotations

import logging
import re
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """Control characters (C0, DEL, C1, Unicode line separators) as ``\\n``, ``\\x1b``, ``\\u2028``."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class EscapingFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's naming)
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802
        return "\n".join("    " + escape(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return "\n".join("    " + escape(line) for line in stack_info.splitlines())


def install(level: str = "INFO") -> None:
    """The root logger writes to stderr through :class:`EscapingFormatter` (every handler it has,
    so a library that added one is covered too)."""
    logging.basicConfig(level=level, stream=sys.stderr, format=FORMAT)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        handler.setFormatter(EscapingFormatter(FORMAT))
