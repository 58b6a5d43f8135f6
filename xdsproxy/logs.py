"""Structured logging: `key=value` text or one JSON object per line. Fields come from `extra`."""

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        extra = " ".join(
            f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
            for k, v in _fields(record).items()
        )
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(
            {
                k: v if isinstance(v, int | float | bool) else str(v)
                for k, v in _fields(record).items()
            }
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_format = "text"


def configure(level: str = "info", fmt: str = "text") -> None:
    global _format
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def say(message: str, level: int = logging.ERROR) -> None:
    """A command-line message (a bad flag, a file that will not load): `xdsproxy: message` on
    stderr, or one JSON log line with `--log-format json`, so a log pipeline parses every line
    a container writes, start-up errors included."""
    if _format == "json":
        logging.getLogger("xdsproxy").log(level, message)
    else:
        prefix = "xdsproxy: warning: " if level == logging.WARNING else "xdsproxy: "
        print(prefix + message, file=sys.stderr)


def format_in(argv: list[str]) -> str:
    """`--log-format` as given on the command line, before the parser has run (its own errors
    must come out in that format too)."""
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--log-format="):
            return arg.split("=", 1)[1]
    return "text"


class RateLimitedLog:
    """Logs a repeated warning once per cause per interval, with how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, cause: str, message: str, extra: dict[str, object] | None = None) -> None:
        now = time.monotonic()
        last = self._last.get(cause)
        if last is not None and now - last < self.interval:
            self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
            return
        self._last[cause] = now
        fields = dict(extra or {})
        if suppressed := self._suppressed.pop(cause, 0):
            fields["suppressed"] = suppressed
        self.logger.warning(message, extra=fields)
