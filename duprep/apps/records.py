"""The sample business app: a small record store on SQLite, shared by every worker.

What the seed's ``s_process`` did ("operate the database"), with a JSON
request and reply so it can be driven from any language::

    {"op": "put", "key": "k", "value": "v"}   -> {"ok": true}
    {"op": "get", "key": "k"}                 -> {"ok": true, "value": "v"} | {"ok": false, "error": "not found"}
    {"op": "delete", "key": "k"}              -> {"ok": true, "deleted": 1}
    {"op": "list", "prefix": "", "limit": 100} -> {"ok": true, "keys": [...]}

The database file is ``$DUPREP_RECORDS_DB``, by default
``$TMPDIR/duprep-records-<uid>.sqlite``; WAL mode lets every worker process
read while one writes.  Each process opens its own connection lazily.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Literal

import msgspec

from ..bus import Request


class Command(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    op: Literal["get", "put", "delete", "list"]
    key: str = ""
    value: str = ""
    prefix: str = ""
    limit: int = 100


_decode = msgspec.json.Decoder(Command).decode
_encode = msgspec.json.Encoder().encode
_db: sqlite3.Connection | None = None
_db_pid = 0


def db_path() -> str:
    return os.environ.get("DUPREP_RECORDS_DB") or os.path.join(
        tempfile.gettempdir(), f"duprep-records-{os.getuid()}.sqlite")


def _connect() -> sqlite3.Connection:
    global _db, _db_pid
    if _db is None or _db_pid != os.getpid():
        _db = sqlite3.connect(db_path(), timeout=10, isolation_level=None)
        _db.execute("PRAGMA journal_mode=WAL")
        _db.execute("PRAGMA synchronous=NORMAL")
        _db.execute("CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        _db_pid = os.getpid()
    return _db


def execute(cmd: Command) -> dict[str, object]:
    db = _connect()
    if cmd.op == "get":
        row = db.execute("SELECT value FROM records WHERE key = ?", (cmd.key,)).fetchone()
        return {"ok": True, "value": row[0]} if row else {"ok": False, "error": "not found"}
    if cmd.op == "put":
        db.execute("INSERT INTO records (key, value) VALUES (?, ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (cmd.key, cmd.value))
        return {"ok": True}
    if cmd.op == "delete":
        return {"ok": True, "deleted": db.execute("DELETE FROM records WHERE key = ?", (cmd.key,)).rowcount}
    rows = db.execute("SELECT key FROM records WHERE key >= ? AND key < ? ORDER BY key LIMIT ?",
                      (cmd.prefix, cmd.prefix + "\U0010ffff", max(0, min(cmd.limit, 1000)))).fetchall()
    return {"ok": True, "keys": [r[0] for r in rows]}


def handle(request: Request) -> bytes:
    try:
        cmd = _decode(request.data)
    except (msgspec.DecodeError, ValueError) as e:
        return _encode({"ok": False, "error": f"bad command: {e}"})
    return _encode(execute(cmd))
