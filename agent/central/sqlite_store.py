"""One SQLite database owned by one writer thread, with a read connection for the event loop.

Commits (with fsync under ``synchronous=FULL``) run on the writer thread so they never stall the
loop; reads run on the loop thread with their own connection, which WAL mode allows alongside the
writer. Used by the outbox and the verdict store.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction on an autocommit connection: committed whole, or rolled back."""
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SchemaTooNew(Exception):
    """The database was written by a newer sortgate (a schema this version does not know)."""


def migrate(conn: sqlite3.Connection, path: Path, schema: str, version: int, steps: dict[int, str]) -> int:
    """Bring the database to schema ``version``; returns the version it had (0: new).

    ``PRAGMA user_version`` holds the schema version. A new database gets ``schema`` whole; an
    older one runs ``steps[n]`` (the SQL from n to n + 1) for each step, in one transaction with
    the version bump, so a crash leaves the old version or the new one. Databases from before
    versions were kept (user_version 0 with tables) are version 1. A newer one is refused: rolling
    back across a schema change means restoring the installer's backup of the state."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found == 0 and conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]:
        found = 1
    if found > version:
        raise SchemaTooNew(
            f"{path}: schema version {found} is newer than this sortgate's ({version}); "
            "run the newer version, or restore the state backed up before the upgrade"
        )
    scripts = [schema] if found == 0 else [steps[n] for n in range(found, version)]
    with transaction(conn):
        for script in scripts:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {int(version)}")
    return found


class SqliteStore:
    def __init__(
        self, path: Path, schema: str, synchronous: str, thread_name: str,
        version: int = 1, steps: dict[int, str] | None = None,
    ) -> None:
        """``schema``: the SQL of schema ``version`` whole; ``steps``: the SQL from each older
        version to the next (see ``migrate``). Raises SchemaTooNew for a newer database."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._writer: sqlite3.Connection | None = None

        def _open() -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={synchronous}")
                migrate(conn, path, schema, version, steps or {})
            except BaseException:
                conn.close()
                raise
            self._writer = conn

        try:
            self._pool.submit(_open).result()
        except BaseException:
            self._pool.shutdown()
            raise
        self.reader = sqlite3.connect(path, isolation_level=None)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(writer_connection)`` on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._with_writer, fn)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """``fn(writer_connection)`` on the writer thread, without waking the event loop when it
        is done (a write nobody waits for; its Future tells how it went)."""
        return self._pool.submit(self._with_writer, fn)

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
