"""The results database: one SQLite file per sweep output directory, safe against a kill at any moment.

Tables: `experiment` (one row: name, canonical config JSON and its hash), `environments` (one row per bench
invocation: library versions, CPU, threads, device), `tasks` (one per model x recipe x dataset: status,
error, Quantized info) and `utterances` (one row per transcribed utterance, UNIQUE per task).

Crash safety: WAL with synchronous=FULL, and each batch of rows is one transaction, so a kill loses at most
the batch in flight; rows are inserted with OR IGNORE, so a batch delivered twice is stored once. The file
is created under a temporary name and renamed into place, so a half-created database never exists.
Summary figures are never stored: `results()` recomputes them from the rows with `evaluate.summarize`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from whisper_ptq.errors import UserError
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.rows import UtteranceResult, summarize

RESULTS_FILE = "results.sqlite"  # the store of a bench, sensitivity or search output dir
SCHEMA_VERSION = 1  # PRAGMA user_version; also how a whisper-ptq database is told from any other SQLite file
STATUSES = ("pending", "running", "done", "failed", "skipped")
# A task that has not ended is "partial" in results(): it resumes on the next run.
RESULT_STATUS = {"pending": "partial", "running": "partial", "done": "done", "failed": "failed", "skipped": "skipped"}
ROW_FIELDS = ("reference", "hypothesis", "ref_words", "word_errors", "ref_chars", "char_errors", "audio_seconds")

SCHEMA = f"""
CREATE TABLE experiment (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE environments (
    id INTEGER PRIMARY KEY,
    recorded_at TEXT NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    position INTEGER NOT NULL,
    model TEXT NOT NULL,
    recipe TEXT NOT NULL,
    recipe_spec TEXT NOT NULL,
    dataset TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
    error TEXT,
    info TEXT NOT NULL DEFAULT '{{}}',
    environment_id INTEGER REFERENCES environments (id),
    started_at TEXT,
    finished_at TEXT,
    UNIQUE (model, recipe, dataset)
);
CREATE TABLE utterances (
    task_id INTEGER NOT NULL REFERENCES tasks (id),
    utterance_id TEXT NOT NULL,
    reference TEXT NOT NULL,
    hypothesis TEXT NOT NULL,
    ref_words INTEGER NOT NULL,
    word_errors INTEGER NOT NULL,
    ref_chars INTEGER NOT NULL,
    char_errors INTEGER NOT NULL,
    audio_seconds REAL NOT NULL,
    seconds REAL NOT NULL,
    environment_id INTEGER REFERENCES environments (id),
    UNIQUE (task_id, utterance_id)
);
PRAGMA user_version = {SCHEMA_VERSION};
"""


@dataclass(frozen=True)
class StoredExperiment:
    name: str
    config: dict[str, Any]
    config_hash: str


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _measured(config: dict[str, Any], unmeasured: Collection[str]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in unmeasured}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Store:
    def __init__(self, db: sqlite3.Connection, path: Path):
        self._db, self.path = db, path
        name, config, digest = db.execute("SELECT name, config, config_hash FROM experiment").fetchone()
        self.experiment = StoredExperiment(name, json.loads(config), digest)

    # ------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: Path) -> Store:
        """An existing database; refused with a clear error when it is corrupt or not ours."""
        if not path.is_file():
            raise UserError(f"no results database at {path}")
        try:
            db = _connect(path)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{path} is corrupt or not a SQLite database ({exc}); move it away or delete it") from None
        if check != "ok":
            raise UserError(f"{path} is corrupt ({check}); move it away or delete it")
        if version != SCHEMA_VERSION:
            raise UserError(f"{path} is not a whisper-ptq results database (schema version {version})")
        return cls(db, path)

    @classmethod
    def create(cls, path: Path, name: str, config: dict[str, Any], unmeasured: Collection[str] = ()) -> Store:
        tmp = path.with_name(f".{path.name}.creating")
        _remove_database(tmp)  # left over from a creation that was killed
        db = sqlite3.connect(tmp)
        with db:
            db.executescript(SCHEMA)
            db.execute(
                "INSERT INTO experiment (id, name, config, config_hash, created_at) VALUES (1, ?, ?, ?, ?)",
                (name, json.dumps(config, sort_keys=True), config_hash(_measured(config, unmeasured)), _now()),
            )
        db.close()
        tmp.replace(path)
        return cls.open(path)

    @classmethod
    def for_experiment(
        cls, path: Path, name: str, config: dict[str, Any], force: bool = False, unmeasured: Collection[str] = ()
    ) -> Store:
        """The database of this experiment at `path`: created, or reopened to resume. One holding another
        experiment is refused unless `force`, which discards it. Keys in `unmeasured` change no stored row
        (how the report reads them, how often speed is timed): they are left out of the identity hash, and a
        resumed database takes their new values."""
        if not path.exists():
            return cls.create(path, name, config, unmeasured)
        store = cls.open(path)
        if store.experiment.config_hash == config_hash(_measured(config, unmeasured)):
            if store.experiment.config != config:
                with store._db:
                    store._db.execute("UPDATE experiment SET config = ?", (json.dumps(config, sort_keys=True),))
                store.experiment = StoredExperiment(store.experiment.name, config, store.experiment.config_hash)
            return store
        store.close()
        if not force:
            raise UserError(
                f"{path.parent} holds results of a different experiment ({store.experiment.name!r}, "
                "other settings); use --force to discard them and start afresh, or choose another --out"
            )
        _remove_database(path)
        return cls.create(path, name, config, unmeasured)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- writing

    def record_environment(self, info: dict[str, Any]) -> int:
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO environments (recorded_at, info) VALUES (?, ?)", (_now(), json.dumps(info, default=str))
            )
        return cursor.lastrowid

    def ensure_task(
        self, position: int, model: str, recipe: Recipe, dataset: str, replace_changed: bool = False
    ) -> int:
        """The id of the (model, recipe, dataset) task, added as pending on first sight. A stored task whose
        recipe of this name was defined otherwise holds another recipe's results: refused, or with
        `replace_changed` dropped with its rows (a search's mix, chosen again on more data)."""
        spec = json.dumps(recipe.to_dict())
        key = (model, recipe.name, dataset)
        with self._db:
            found = self._db.execute(
                "SELECT id, recipe_spec FROM tasks WHERE model = ? AND recipe = ? AND dataset = ?", key
            ).fetchone()
            if found and found[1] != spec:
                if not replace_changed:
                    raise UserError(
                        f"{self.path} holds results of another recipe named {recipe.name!r} (on {dataset}); "
                        "use --force to discard them, or choose another --out"
                    )
                self._db.execute("DELETE FROM utterances WHERE task_id = ?", (found[0],))
                self._db.execute("DELETE FROM tasks WHERE id = ?", (found[0],))
                found = None
            if found:
                return found[0]
            cursor = self._db.execute(
                "INSERT INTO tasks (position, model, recipe, recipe_spec, dataset) VALUES (?, ?, ?, ?, ?)",
                (position, model, recipe.name, spec, dataset),
            )
        return cursor.lastrowid

    def add_rows(self, task_id: int, rows: Iterable[UtteranceResult], environment_id: int | None = None) -> None:
        """One transaction per batch; a row already stored (a batch delivered twice) is kept as it was."""
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO utterances (task_id, utterance_id, reference, hypothesis, ref_words, "
                "word_errors, ref_chars, char_errors, audio_seconds, seconds, environment_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(task_id, r.id, *(getattr(r, f) for f in ROW_FIELDS), r.seconds, environment_id) for r in rows],
            )

    def set_status(
        self, task_id: int, status: str, error: str | None = None, environment_id: int | None = None
    ) -> None:
        """Move a task to `status`; running stamps the start (and who runs it), an end stamps the finish."""
        if status == "running":
            sql = "UPDATE tasks SET status = ?, error = ?, started_at = ?, environment_id = ? WHERE id = ?"
            args = (status, error, _now(), environment_id, task_id)
        else:
            sql = "UPDATE tasks SET status = ?, error = ?, finished_at = ? WHERE id = ?"
            args = (status, error, None if status == "pending" else _now(), task_id)
        with self._db:
            self._db.execute(sql, args)

    def merge_info(self, task_id: int, info: dict[str, Any]) -> None:
        """Add keys to a task's info (in Python, not json_patch, which would drop keys whose value is null)."""
        with self._db:
            merged = {**self.info(task_id), **info}
            self._db.execute("UPDATE tasks SET info = ? WHERE id = ?", (json.dumps(merged, default=str), task_id))

    # ------------------------------------------------------------------------------------- reading

    def status(self, task_id: int) -> str:
        return self._db.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]

    def info(self, task_id: int) -> dict[str, Any]:
        (stored,) = self._db.execute("SELECT info FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return json.loads(stored)

    def done_ids(self, task_id: int) -> set[str]:
        cursor = self._db.execute("SELECT utterance_id FROM utterances WHERE task_id = ?", (task_id,))
        return {row[0] for row in cursor}

    def rows(self, task_id: int) -> list[UtteranceResult]:
        cursor = self._db.execute(
            f"SELECT utterance_id, {', '.join(ROW_FIELDS)}, seconds FROM utterances "
            "WHERE task_id = ? ORDER BY utterance_id",
            (task_id,),
        )
        return [UtteranceResult(*row) for row in cursor]

    def results(self) -> list[dict[str, Any]]:
        """One dict per task in experiment order, as the report consumes them (see the results contract)."""
        tasks = self._db.execute(
            "SELECT id, model, recipe, dataset, recipe_spec, status, error, info FROM tasks ORDER BY position"
        ).fetchall()
        results = []
        for task_id, model, recipe, dataset, recipe_spec, status, error, info in tasks:
            rows = self.rows(task_id)
            results.append(
                {
                    "model": model,
                    "recipe": recipe,
                    "dataset": dataset,
                    "recipe_spec": json.loads(recipe_spec),
                    "status": RESULT_STATUS[status],
                    "error": error,
                    "summary": {**json.loads(info), **summarize(rows)} if rows else {},
                    "utterances": [row.to_dict() for row in rows],
                }
            )
        return results


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")  # readers (a report, a test) never block the writer
    db.execute("PRAGMA synchronous = FULL")  # a committed batch survives power loss, not only a kill
    db.execute("PRAGMA foreign_keys = ON")
    return db


def _remove_database(path: Path) -> None:
    # "-journal" belongs to a database killed while being created, before WAL was switched on.
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
