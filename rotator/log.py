"""Logging set-up: one line per event, every remembered secret scrubbed before output.

JSON lines when stderr is not a terminal (journald, Kubernetes, a log shipper), readable text
when it is; ``ROTATOR_LOG_FORMAT=json|text`` overrides. Rotation context (credential, agent,
provider, rotation id, step, duration) travels as ``extra`` fields and becomes JSON keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

from rotator import redaction
from rotator.events import RotationFinished, StepFinished

__all__ = ["JsonFormatter", "RedactingFilter", "log_event", "setup_logging"]

CONTEXT_FIELDS = ("credential", "agent", "provider", "rotation_id", "step", "status",
                  "outcome", "trigger", "duration_seconds")
events_log = logging.getLogger("rotator.events")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the rotation context."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False)


def log_event(event: StepFinished | RotationFinished) -> None:
    """An engine listener: one log line per finished step and per finished rotation."""
    context = {"credential": event.credential, "agent": event.agent,
               "provider": event.provider, "rotation_id": event.rotation_id,
               "duration_seconds": round(event.duration, 3)}
    if isinstance(event, StepFinished):
        level = logging.INFO if event.status == "succeeded" else logging.WARNING
        events_log.log(level, "%s: step %s %s in %.3fs%s", event.credential, event.step,
                       event.status, event.duration,
                       f": {event.message}" if event.message else "",
                       extra={**context, "step": event.step, "status": event.status})
    else:
        level = logging.INFO if event.outcome == "success" else logging.WARNING
        events_log.log(level, "%s: rotation %s (%s) ended %s after %.1fs", event.credential,
                       event.rotation_id, event.trigger, event.outcome, event.duration,
                       extra={**context, "outcome": event.outcome, "trigger": event.trigger})


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
    wanted = os.environ.get("ROTATOR_LOG_FORMAT", "").lower()
    if wanted == "json" or (wanted != "text" and not sys.stderr.isatty()):
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("apscheduler", "httpx", "httpcore", "httpx2", "httpcore2", "urllib3",
                  "openai", "alembic", "hvac", "stripe", "botocore", "boto3", "psycopg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
