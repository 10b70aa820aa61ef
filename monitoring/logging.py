"""structlog set-up: JSON lines when the log stream is not a terminal, the console renderer when it is.

Logs go to stderr, because stdout carries the CLI's `--json` output. In a Ray worker
stderr is the worker's log file (`logs/worker-*.err` of the Ray session), which is not
a terminal, so replicas always write JSON.

Request ids travel as explicit fields (`log.info("request", request_id=...)`), never
as contextvars bound in the request handler. An asyncio task copies the context of
the task that created it, and `@serve.batch` (Ray Serve 2.60) creates its batch loop
inside the first request that arrives, so a bound request id would appear on every
later batch's lines.
`structlog.contextvars` stays merged for code that binds a value for the life of one
task (`bound_contextvars` restores the previous value on exit).

Values under keys that name secrets or message bodies are replaced before rendering,
and bytes values are reduced to their length, so no token or payload reaches a log.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import structlog

__all__ = ["REDACTED", "SENSITIVE_KEYS", "RateLimitedWarning", "configure_logging", "get_logger", "redact_secrets"]

_configured = False

# Keys whose values never reach a log line; compared case-insensitively.
SENSITIVE_KEYS = frozenset({"token", "admin_token", "authorization", "password", "secret", "payload", "body"})
REDACTED = "[redacted]"


def redact_secrets(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: replace sensitive values, and bytes by their length."""
    for key, value in event_dict.items():
        if key.lower() in SENSITIVE_KEYS:
            event_dict[key] = REDACTED
        elif isinstance(value, (bytes, bytearray, memoryview)):
            event_dict[key] = f"<{len(value)} bytes>"
    return event_dict


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at each write.

    Loggers are cached, so a stream captured once would outlive a replaced and closed
    `sys.stderr` (test capture, daemonised processes) and fail every later log call.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(json_output: bool | None = None, level: int = logging.INFO,
                      stream: TextIO | None = None) -> None:
    """Configure structlog for this process; loggers created after a later call use that call's settings.

    Args:
        json_output: force JSON (True) or console (False) output; None picks JSON unless
            the stream is a terminal.
        level: minimum level logged.
        stream: where lines go; None means `sys.stderr` as it is at each write.
    """
    global _configured
    stream = _CurrentStderr() if stream is None else stream
    if json_output is None:
        json_output = not stream.isatty()
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str, **bound) -> structlog.typing.FilteringBoundLogger:
    """Return a logger bound to `component=name`; configures logging with defaults on first use."""
    if not _configured:
        configure_logging()
    return structlog.get_logger().bind(component=name, **bound)


class RateLimitedWarning:
    """Emits a repeated warning at most once per `interval_s` and key, with the count suppressed since.

    Not thread-safe; one event loop owns an instance.
    """

    def __init__(self, interval_s: float = 30.0, clock=time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, logger, event: str, key: str | None = None, **fields) -> bool:
        """Log `event` unless the same key was logged less than `interval_s` ago; returns whether it was logged.

        Args:
            key: what counts as a repeat; defaults to `event`. Use e.g. `f"{event}:{expert}"`
                so that one failing expert does not hide another.
        """
        key = event if key is None else key
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        logger.warning(event, suppressed=suppressed, **fields)
        return True
