"""The business functions every Python peer runs: ``echo`` and ``kv``.

Each is a ``handler(request) -> bytes`` with ``request.data`` the payload, the
signature ``duprep serve --app benchmarks.apps:echo`` expects, so duprep and
the other Python peers (forking, iterative, asyncio pool, pyzmq workers) run
the very same function.  Peers that do not have duprep's ``Request`` wrap the
payload in :class:`BenchRequest`.

``kv`` is the sample SQLite record app: get/put/delete/list on one small table
in WAL mode, one database file shared by all worker processes of a peer.  The
file is named by the environment variable ``DUPREP_BENCH_KV_DB`` (set by the
harness, created by :func:`prepare_kv_db` before the server starts).  Each
process opens its own connection on first use and re-opens after a fork
(SQLite connections must not cross a fork).

Request payload of ``kv`` (built by loadgen.c; every request is exactly P
bytes so all peers move the same bytes)::

    +----+---------------+----------------------+
    | op | key (u32, BE) | value / padding      |
    +----+---------------+----------------------+
     'g' get     -> the stored value, or b"" if absent
     'p' put     -> b"\\x01" (value = the rest of the payload)
     'd' delete  -> b"\\x01" if a row was deleted, else b"\\x00"
     'l' list    -> up to 10 keys >= key, each a u32 BE
"""

from __future__ import annotations

import os
import sqlite3
import struct
from typing import Protocol

__all__ = ["HasData", "BenchRequest", "echo", "kv", "prepare_kv_db", "KV_DB_ENV", "KV_KEYS", "HANDLERS"]

KV_DB_ENV = "DUPREP_BENCH_KV_DB"
KV_KEYS = 1000           # keys 0..999, the loadgen picks from the same range
KV_LIST_LIMIT = 10
_KEY = struct.Struct(">I")


class HasData(Protocol):
    """What a handler needs from a request: the payload bytes."""

    @property
    def data(self) -> bytes: ...


class BenchRequest:
    """The request object the non-duprep peers pass to a handler."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def echo(request: HasData) -> bytes:
    """Return the payload unchanged: measures the server, not the work."""
    return request.data


class _KVStore:
    """One SQLite connection per process, re-opened after fork."""

    __slots__ = ("_pid", "_db")

    def __init__(self) -> None:
        self._pid = -1
        self._db: sqlite3.Connection | None = None

    def db(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():
            path = os.environ.get(KV_DB_ENV)
            if not path:
                raise RuntimeError(f"{KV_DB_ENV} is not set")
            # Not closing an inherited connection is deliberate: the parent owns it.
            self._db = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._pid = os.getpid()
        return self._db


_store = _KVStore()


def kv(request: HasData) -> bytes:
    """Serve one get/put/delete/list request on the shared records table."""
    data = request.data
    if len(data) < 5:
        raise ValueError("kv request shorter than 5 bytes")
    op = data[0]
    (key,) = _KEY.unpack_from(data, 1)
    db = _store.db()
    if op == 0x67:      # 'g'
        row = db.execute("SELECT value FROM records WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else b""
    if op == 0x70:      # 'p'
        db.execute("INSERT OR REPLACE INTO records(key, value) VALUES (?, ?)", (key, data[5:]))
        return b"\x01"
    if op == 0x64:      # 'd'
        cur = db.execute("DELETE FROM records WHERE key = ?", (key,))
        return b"\x01" if cur.rowcount else b"\x00"
    if op == 0x6C:      # 'l'
        rows = db.execute("SELECT key FROM records WHERE key >= ? ORDER BY key LIMIT ?", (key, KV_LIST_LIMIT))
        return b"".join(_KEY.pack(k) for (k,) in rows)
    raise ValueError(f"unknown kv op {op!r}")


def prepare_kv_db(path: str, *, keys: int = KV_KEYS, value_size: int = 59) -> None:
    """Create (or reset) the records table in WAL mode with ``keys`` rows."""
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("DROP TABLE IF EXISTS records")
        db.execute("CREATE TABLE records (key INTEGER PRIMARY KEY, value BLOB NOT NULL)")
        db.execute("BEGIN")
        db.executemany("INSERT INTO records(key, value) VALUES (?, ?)",
                       ((k, bytes([k % 251]) * value_size) for k in range(keys)))
        db.execute("COMMIT")
    db.close()


HANDLERS = {"echo": echo, "kv": kv}
