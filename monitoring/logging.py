"""structlog set-up: JSON lines when stderr is not a terminal, the console renderer when it is."""

from __future__ import annotations

import logging
import sys
import time

import structlog

__all__ = ["RateLimitedWarning", "configure_logging", "get_logger"]

_configured = False


def configure_logging(json_output: bool | None = None, level: int = logging.INFO) -> None:
    """Configure structlog once per process.

    Args:
        json_output: force JSON (True) or console (False) output; None picks JSON unless
            stderr is a terminal.
        level: minimum level logged.
    """
    global _configured
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str, **bound) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to `component=name`; configures logging with defaults on first use."""
    if not _configured:
        configure_logging()
    return structlog.get_logger().bind(component=name, **bound)


class RateLimitedWarning:
    """Emits a repeated warning at most once per `interval_s`, with the count suppressed since.

    Not thread-safe; one event loop owns an instance.
    """

    def __init__(self, interval_s: float = 30.0, clock=time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, logger, event: str, **fields) -> bool:
        """Log `event` unless it was logged less than `interval_s` ago; returns whether it was logged."""
        now = self._clock()
        last = self._last.get(event)
        if last is not None and now - last < self.interval_s:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return False
        suppressed = self._suppressed.pop(event, 0)
        self._last[event] = now
        logger.warning(event, suppressed=suppressed, **fields)
        return True
