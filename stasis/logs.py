"""Structured logs on stderr. Keys, passwords and memory contents are never passed to a logger."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(level: str | None = None, json_logs: bool | None = None) -> None:
    level = (level or os.environ.get("STASIS_LOG_LEVEL", "info")).upper()
    json_logs = json_logs if json_logs is not None else os.environ.get("STASIS_LOG_FORMAT") == "json"
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    renderer = (structlog.processors.JSONRenderer() if json_logs
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), structlog.processors.format_exc_info,
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr), cache_logger_on_first_use=True)
