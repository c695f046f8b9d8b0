"""Streaming CSV and JSON exports of a filtered set of audit events.

Both stream from the database in chunks (an export of a year of history must not be
built in memory). CSV cells that a spreadsheet would run as a formula (starting with
= + - @, or a tab or carriage return that some spreadsheets strip first) get a leading
apostrophe: an attacker-chosen user or host name must not become a formula on the
auditor's machine. JSON needs no such escaping and keeps values exact.
"""

import csv
import json

from django.core.serializers.json import DjangoJSONEncoder

COLUMNS = [
    "id",
    "at",
    "actor_id",
    "actor_name",
    "action",
    "target_type",
    "target_id",
    "target_name",
    "ip",
    "outcome",
    "details",
    "prev_hash",
    "hash",
]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CHUNK = 1000


def row_dict(event):
    return {
        "id": event.id,
        "at": event.at.isoformat(),
        "actor_id": event.actor_id,
        "actor_name": event.actor_name,
        "action": event.action,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "target_name": event.target_name,
        "ip": event.ip,
        "outcome": event.outcome,
        "details": event.details,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


def csv_cell(value):
    """Text for one CSV cell, defused against formula injection."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True, ensure_ascii=False, cls=DjangoJSONEncoder)
    text = str(value)
    if text.startswith(FORMULA_START):
        return "'" + text
    return text


class _Echo:
    """A file-like object whose write() returns what it was given (csv.writer -> stream)."""

    def write(self, value):
        return value


def csv_stream(events):
    writer = csv.writer(_Echo())
    yield "\ufeff"  # BOM: spreadsheets then read the UTF-8 (Chinese names) correctly
    yield writer.writerow(COLUMNS)
    for event in events.iterator(chunk_size=CHUNK):
        row = row_dict(event)
        yield writer.writerow([csv_cell(row[c]) for c in COLUMNS])


def json_stream(events):
    yield "[\n"
    first = True
    for event in events.iterator(chunk_size=CHUNK):
        text = json.dumps(row_dict(event), ensure_ascii=False, cls=DjangoJSONEncoder)
        yield ("" if first else ",\n") + text
        first = False
    yield "\n]\n"
