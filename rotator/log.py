"""Logging set-up: one line per event, every remembered secret scrubbed before output."""

from __future__ import annotations

import logging
import sys

from rotator import redaction

__all__ = ["RedactingFilter", "setup_logging"]


class RedactingFilter(logging.Filter):
    """Second line of defence: replaces any secret the process has handled with [REDACTED]."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = redaction.scrub(message)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redaction.scrub(
                logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if scrubbed != message or record.args:
            record.msg, record.args = scrubbed, None
        return True


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("apscheduler", "httpx", "httpcore", "httpx2", "httpcore2", "urllib3",
                  "openai", "alembic", "hvac"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
