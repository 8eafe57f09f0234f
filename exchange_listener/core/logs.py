"""structlog setup: JSON lines when not on a terminal, readable output on one.

Secrets never reach a log line: the ``redact_secrets`` processor blanks any event key that
names one, whatever the caller passed.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

_SECRET_WORDS = ("password", "secret", "token", "authorization")


def redact_secrets(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    for key in list(event_dict):
        if any(word in key.lower() for word in _SECRET_WORDS):
            event_dict[key] = "***"
    return event_dict


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and route stdlib logging (rq, exchangelib) through the same renderer."""
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Processor = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info if as_json else structlog.processors.StackInfoRenderer(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # a library's exc_info (rq's "unhandled exception") as traceback text, not a tuple's repr
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        *([structlog.processors.format_exc_info] if as_json else []), renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if level == "debug" else logging.getLevelName(level.upper()))
    # exchangelib logs full SOAP bodies at DEBUG (credentials live in headers, not bodies, but
    # keep it quiet anyway); rq's own INFO lines are useful.
    logging.getLogger("exchangelib").setLevel(logging.WARNING)
    logging.getLogger("rq").setLevel(logging.INFO if level != "debug" else logging.DEBUG)


def get_logger(**context: Any) -> FilteringBoundLogger:
    """A lazy logger: safe at import time, it follows whatever ``configure`` set up last."""
    # a lazy proxy typed Any by structlog; it acts as the filtering logger configure() makes
    return cast(FilteringBoundLogger, structlog.get_logger("exchange_listener", **context))
