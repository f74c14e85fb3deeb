"""An on-disk cache of judgements (SQLite), so that a rerun costs nothing and an interrupted run resumes.

Keys cover everything that changes a judgement: the judge's identity (model, endpoint, prompt version, mode), the
question, the answer and the metric. Every judgement is committed as soon as it exists, so a crash loses nothing that
was finished. SQLite's WAL mode lets several processes share one cache file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    metric TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(identity: dict[str, Any], question: str, answer: str, metric: str) -> str:
    """A stable key (SHA-256) of a judge identity, a question, an answer and a metric."""
    payload = json.dumps([identity, question, answer, metric], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgementCache:
    """A thread-safe SQLite store of judge results.

    Args:
        path (`str` or `Path`): the database file (created with its parent folders); `":memory:"` for a throwaway one.

    Example:
    ```python
    cache = JudgementCache("judgements.sqlite")
    judge = OpenAIJudge("gpt-4o-2024-08-06", cache=cache)
    ```
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        with self._lock, self._conn:
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(_SCHEMA)
        self.hits = 0
        self.misses = 0

    def get(self, identity: dict[str, Any], question: str, answer: str, metric: str) -> dict[str, Any] | None:
        """The stored result for this key, or `None`."""
        key = cache_key(identity, question, answer, metric)
        with self._lock:
            row = self._conn.execute("SELECT result FROM judgements WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return json.loads(row[0])

    def put(self, identity: dict[str, Any], question: str, answer: str, metric: str, result: dict[str, Any]) -> None:
        """Stores (or replaces) a result and commits at once."""
        key = cache_key(identity, question, answer, metric)
        judge = json.dumps(identity, sort_keys=True)
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, judge, metric, question, answer, json.dumps(result), time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
