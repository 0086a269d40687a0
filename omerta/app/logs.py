"""
Log output for the daemons: C{--log-format json} writes one JSON object per
line with stable field names.

Fields: C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{message} (the
formatted text), C{traceback} when a failure is attached, and every field
the event was logged with (values that are not JSON become strings).
Components never pass secrets (keys, invite links) as log fields.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider

_LEGACY_KEYS = {"message", "format", "isError", "system", "why", "failure", "time"}


def _field(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_field(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _field(v) for k, v in value.items()}
    return str(value)


def event_as_json(event: dict) -> str:
    """
    One log event as a single line of JSON.
    """
    record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        record[key] = _field(value)
    return json.dumps(record, separators=(",", ":"))


def json_line_observer(out: IO[str]) -> ILogObserver:
    @provider(ILogObserver)
    def observe(event: dict) -> None:
        out.write(event_as_json(event) + "\n")
        out.flush()

    return observe


def json_stdout_observer() -> ILogObserver:
    """
    Observer factory for twistd's C{--logger}: JSON lines on standard output.
    """
    return json_line_observer(sys.stdout)
