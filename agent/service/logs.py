"""structlog set-up: JSON lines for journald and central log shipping, or a console view."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", fmt: str = "json") -> None:
    lvl = getattr(logging, level.upper())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # pymodbus and paho log through stdlib logging: keep them quiet unless debugging
    logging.basicConfig(level=logging.WARNING if lvl > logging.DEBUG else logging.DEBUG, stream=sys.stderr)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL if lvl > logging.DEBUG else logging.DEBUG)
