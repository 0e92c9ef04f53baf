"""One SQLite database owned by one writer thread, with a read connection for the event loop.

Commits (with fsync under ``synchronous=FULL``) run on the writer thread so they never stall the
loop; reads run on the loop thread with their own connection, which WAL mode allows alongside the
writer. Used by the outbox and the verdict store.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class SqliteStore:
    def __init__(self, path: Path, schema: str, synchronous: str, thread_name: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._writer: sqlite3.Connection | None = None

        def _open() -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.executescript(schema)
            self._writer = conn

        self._pool.submit(_open).result()
        self.reader = sqlite3.connect(path, isolation_level=None)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(writer_connection)`` on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._with_writer, fn)

    def _with_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._writer is not None
        return fn(self._writer)

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self.reader.execute(sql, params).fetchall()

    def close(self) -> None:
        self.reader.close()

        def _close() -> None:
            if self._writer is not None:
                self._writer.close()

        self._pool.submit(_close).result()
        self._pool.shutdown()
