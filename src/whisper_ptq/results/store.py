"""The results database: one SQLite file per sweep output directory, safe against a kill at any moment.

Tables: `experiment` (one row: name, canonical config JSON and its hash), `environments` (one row per bench
invocation: library versions, CPU, threads, device), `tasks` (one per model x recipe x dataset: status,
error, Quantized info, and `identity`: what its rows are computed from) and `utterances` (one row per
transcribed utterance, UNIQUE per task, with `source`, the fingerprint of its audio and reference text, and a
`checksum` of its fields).

Crash safety: WAL with synchronous=FULL, and each batch of rows is one transaction, so a kill loses at most
the batch in flight; rows are inserted with OR IGNORE, so a batch delivered twice is stored once. The file
is created under a temporary name and renamed into place, so a half-created database never exists. A
process that writes holds an exclusive lock on `.results.sqlite.lock` beside it (flock: the system releases it
when the process dies, however it dies), so two runs never write one directory at once.

Nothing stale, nothing altered: a task whose model, data location or device differs from the one its rows
were computed with is refused (`ensure_task`), rows whose audio or reference text changed are dropped to be
computed again (`drop_stale`), and a row whose fields no longer match their checksum is reported corrupt on
read. Summary figures are never stored: `results()` recomputes them from the rows' error counts, the one
source of WER, CER, their confidence intervals and paired tests.

Schema versions (PRAGMA user_version; also how a whisper-ptq database is told from any other SQLite file):
1 had no identity, source, checksum, error kinds, language or decoded seconds; `MIGRATIONS` brings a database
up to `SCHEMA_VERSION` when it is opened (in memory only, for a read-only open). Its rows keep an empty source
and checksum: they are checked by their reference text and by scoring their texts again; their error kinds
are counted from their texts, their language is English and their decoded audio at most 30 s, as it was.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from whisper_ptq.errors import UserError
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.metrics import score_utterance
from whisper_ptq.results.rows import UtteranceResult, summarize

RESULTS_FILE = "results.sqlite"  # the store of a bench, sensitivity or search output dir
SCHEMA_VERSION = 2
STATUSES = ("pending", "running", "done", "failed", "skipped")
# A task that has not ended is "partial" in results(): it resumes on the next run.
RESULT_STATUS = {"pending": "partial", "running": "partial", "done": "done", "failed": "failed", "skipped": "skipped"}
# The stored fields of a row besides its id, in UtteranceResult's order.
ROW_FIELDS = tuple(field.name for field in fields(UtteranceResult))[1:]
SQLITE_HEADER = b"SQLite format 3\x00"
TABLES = {"experiment", "environments", "tasks", "utterances"}
# What works after a refusal: bench's --force and --resume exclude each other, so say which to drop.
FORCE_HINT = (
    "to discard them and start afresh, run the same command with --force (and without --resume), "
    "or choose another --out"
)

SCHEMA_V1 = f"""
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
PRAGMA user_version = 1;
"""

# version -> the statements that bring a database of that version to the next one. A new database is created
# as version 1 and migrated, so an old database and a new one end up with the same layout.
MIGRATIONS: dict[int, str] = {
    1: """
        -- JSON: what the task's rows are computed from besides the recipe (`ensure_task`); NULL: not known
        ALTER TABLE tasks ADD COLUMN identity TEXT;
        -- `Dataset.fingerprint` of the row's audio and reference; '' for rows written before version 2
        ALTER TABLE utterances ADD COLUMN source TEXT NOT NULL DEFAULT '';
        -- `_checksum` of the row's fields; '' for rows written before version 2
        ALTER TABLE utterances ADD COLUMN checksum TEXT NOT NULL DEFAULT '';
        -- word-level error kinds (their sum is word_errors); computed from the texts below for older rows
        ALTER TABLE utterances ADD COLUMN substitutions INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE utterances ADD COLUMN deletions INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE utterances ADD COLUMN insertions INTEGER NOT NULL DEFAULT 0;
        -- the texts' language (normalizer); version 1 was English only
        ALTER TABLE utterances ADD COLUMN language TEXT NOT NULL DEFAULT 'en';
        -- some window stopped at the token limit
        ALTER TABLE utterances ADD COLUMN hit_token_limit INTEGER NOT NULL DEFAULT 0;
        -- audio the engine decoded: version 1's engines decoded at most the first 30 s of an utterance
        ALTER TABLE utterances ADD COLUMN decoded_seconds REAL;
        UPDATE utterances SET decoded_seconds = MIN(audio_seconds, 30.0);
    """,
}


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
    def __init__(self, db: sqlite3.Connection, path: Path, lock: int | None = None):
        self._db, self.path, self._lock = db, path, lock
        self.replace_changed = False  # opened with `force`: every `ensure_task` replaces a changed task
        name, config, digest = db.execute("SELECT name, config, config_hash FROM experiment").fetchone()
        self.experiment = StoredExperiment(name, json.loads(config), digest)

    # ------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: Path, writable: bool = True) -> Store:
        """An existing database, brought to the current schema; refused with a clear error, and left as it
        was, when it is corrupt or not ours. Read-only (`writable=False`, for a report) it is never written."""
        return cls(_open(path, writable), path)

    @classmethod
    def create(cls, path: Path, name: str, config: dict[str, Any], unmeasured: Collection[str] = ()) -> Store:
        tmp = path.with_name(f".{path.name}.creating")
        try:
            _remove_database(tmp)  # left over from a creation that was killed
            db = sqlite3.connect(tmp)
            try:
                db.executescript(SCHEMA_V1)
                _migrate(db)
                with db:
                    db.execute(
                        "INSERT INTO experiment (id, name, config, config_hash, created_at) VALUES (1, ?, ?, ?, ?)",
                        (name, json.dumps(config, sort_keys=True), config_hash(_measured(config, unmeasured)), _now()),
                    )
            finally:
                db.close()
            tmp.replace(path)
        except (OSError, sqlite3.Error) as exc:
            _remove_database(tmp)
            raise UserError(f"cannot create {path}: {_reason(exc)}") from None
        return cls.open(path)

    @classmethod
    def for_experiment(
        cls, path: Path, name: str, config: dict[str, Any], force: bool = False, unmeasured: Collection[str] = ()
    ) -> Store:
        """The database of this experiment at `path`: created, or reopened to resume, and locked against every
        other writer until closed. One holding another experiment is refused unless `force`, which discards it
        (and with it every task whose rows were computed from anything else, see `ensure_task`).
        Keys in `unmeasured` change no stored row (how the report reads them, how often speed is timed): they
        are left out of the identity hash, and a resumed database takes their new values."""
        lock = _lock(path)
        try:
            store = cls._for_experiment(path, name, config, force, unmeasured)
        except BaseException:
            os.close(lock)
            raise
        store._lock, store.replace_changed = lock, force
        return store

    @classmethod
    def _for_experiment(
        cls, path: Path, name: str, config: dict[str, Any], force: bool, unmeasured: Collection[str]
    ) -> Store:
        if not path.exists():
            return cls.create(path, name, config, unmeasured)
        store = cls.open(path)
        if store.experiment.config_hash == config_hash(_measured(config, unmeasured)):
            if store.experiment.config != config:
                with store._transaction() as db:
                    db.execute("UPDATE experiment SET config = ?", (json.dumps(config, sort_keys=True),))
                store.experiment = StoredExperiment(store.experiment.name, config, store.experiment.config_hash)
            return store
        store.close()
        if not force:
            old, new = _measured(store.experiment.config, unmeasured), _measured(config, unmeasured)
            changed = [key for key in sorted({*old, *new}) if old.get(key) != new.get(key)]
            what = ", ".join(f"{key} {_brief(old.get(key))} then, {_brief(new.get(key))} now" for key in changed)
            raise UserError(
                f"{path.parent} holds results of a different experiment ({store.experiment.name!r}: {what}); "
                + FORCE_HINT
            )
        try:
            _remove_database(path)
        except OSError as exc:
            raise UserError(f"cannot remove {path}: {exc.strerror}") from None
        return cls.create(path, name, config, unmeasured)

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- writing

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a failed write (disk full, read-only file) rolls back, leaving every earlier
        transaction intact, and becomes one line."""
        try:
            with self._db:
                yield self._db
        except sqlite3.Error as exc:
            raise UserError(
                f"cannot write {self.path}: {_reason(exc)}; what it holds is intact: fix that and run the same "
                "command again to resume"
            ) from None

    def record_environment(self, info: dict[str, Any]) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO environments (recorded_at, info) VALUES (?, ?)", (_now(), json.dumps(info, default=str))
            )
        return cursor.lastrowid

    def ensure_task(
        self,
        position: int,
        model: str,
        recipe: Recipe,
        dataset: str,
        identity: dict[str, Any] | None = None,
        replace_changed: bool = False,
    ) -> int:
        """The id of the (model, recipe, dataset) task, added as pending on first sight. `identity`: what its
        rows are computed from besides the recipe (model content, data location, device, code, library versions:
        see `studies.identity.run_identity`). A stored task computed from anything else, a recipe of this name
        defined otherwise included, holds other results: refused, or with `replace_changed` (or in a store
        opened with `force`) dropped with its rows (a search's mix, chosen again on more data). A key the stored
        task lacks (written before it was recorded) is taken as it is now."""
        spec = json.dumps(recipe.to_dict())
        current = {"recipe": recipe.to_dict(), **(identity or {})}
        key = (model, recipe.name, dataset)
        with self._transaction() as db:
            found = db.execute(
                "SELECT id, recipe_spec, identity FROM tasks WHERE model = ? AND recipe = ? AND dataset = ?", key
            ).fetchone()
            if found:
                task_id, stored_spec, stored_identity = found
                stored = json.loads(stored_identity) if stored_identity else {"recipe": json.loads(stored_spec)}
                changed = next((k for k in current if k in stored and stored[k] != current[k]), None)
                if changed is not None and not (replace_changed or self.replace_changed):
                    raise UserError(_changed_message(self.path, model, recipe.name, dataset, changed, stored, current))
                if changed is None:
                    if stored != current:
                        db.execute("UPDATE tasks SET identity = ? WHERE id = ?", (json.dumps(current), task_id))
                    return task_id
                db.execute("DELETE FROM utterances WHERE task_id = ?", (task_id,))
                db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            cursor = db.execute(
                "INSERT INTO tasks (position, model, recipe, recipe_spec, dataset, identity) VALUES (?, ?, ?, ?, ?, ?)",
                (position, model, recipe.name, spec, dataset, json.dumps(current)),
            )
        return cursor.lastrowid

    def add_rows(self, task_id: int, rows: Iterable[UtteranceResult], environment_id: int | None = None) -> None:
        """One transaction per batch; a row already stored (a batch delivered twice) is kept as it was."""
        with self._transaction() as db:
            db.executemany(
                f"INSERT OR IGNORE INTO utterances (task_id, utterance_id, {', '.join(ROW_FIELDS)}, checksum, "
                f"environment_id) VALUES ({', '.join('?' * (len(ROW_FIELDS) + 4))})",
                [(task_id, r.id, *_values(r), _checksum(r), environment_id) for r in rows],
            )

    def drop_stale(
        self, task_id: int, expected: Mapping[str, tuple[str, str | None]], keep_unlisted: bool = False
    ) -> list[str]:
        """Delete the task's rows that were computed from other data than `expected` (utterance id ->
        (`Dataset.fingerprint`, reference text) now) says, and, unless `keep_unlisted`, rows of utterances it
        no longer lists; returns their ids. A row written before fingerprints is judged by its reference."""
        stale = [
            row.id
            for row in self.rows(task_id)
            if (row.id not in expected and not keep_unlisted) or (row.id in expected and _stale(row, *expected[row.id]))
        ]
        if stale:
            with self._transaction() as db:
                db.executemany(
                    "DELETE FROM utterances WHERE task_id = ? AND utterance_id = ?", [(task_id, i) for i in stale]
                )
        return stale

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
        with self._transaction() as db:
            db.execute(sql, args)

    def merge_info(self, task_id: int, info: dict[str, Any]) -> None:
        """Add keys to a task's info (in Python, not json_patch, which would drop keys whose value is null)."""
        with self._transaction() as db:
            merged = {**self.info(task_id), **info}
            db.execute("UPDATE tasks SET info = ? WHERE id = ?", (json.dumps(merged, default=str), task_id))

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
        """The task's rows, each checked against its checksum (or, written before checksums, against the
        error counts of its texts): a row altered since it was written is refused as corrupt, by its id."""
        cursor = self._db.execute(
            f"SELECT utterance_id, {', '.join(ROW_FIELDS)}, checksum FROM utterances "
            "WHERE task_id = ? ORDER BY utterance_id",
            (task_id,),
        )
        rows = []
        for utterance_id, *values, checksum in cursor:
            row = UtteranceResult(utterance_id, *values)
            row = replace(row, hit_token_limit=bool(row.hit_token_limit))  # SQLite keeps booleans as integers
            if (checksum != _checksum(row)) if checksum else (row.rescored() != row):
                model, recipe, dataset = self._db.execute(
                    "SELECT model, recipe, dataset FROM tasks WHERE id = ?", (task_id,)
                ).fetchone()
                what = "its checksum" if checksum else "the error counts of its texts"
                raise UserError(
                    f"{self.path} is corrupt: the stored row of utterance {utterance_id!r} ({model} {recipe} on "
                    f"{dataset}) no longer matches {what}; restore the file from a copy, or move it away and run again"
                )
            rows.append(row)
        return rows

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


# ------------------------------------------------------------------------------------------------- rows


def _values(row: UtteranceResult) -> tuple[Any, ...]:
    return tuple(getattr(row, field) for field in ROW_FIELDS)


def _checksum(row: UtteranceResult) -> str:
    """A hash of every stored field of the row: its pieces (texts, counts, timing, source) are written together
    and must be read back together (floats go through JSON's shortest round-trip form, as SQLite keeps them)."""
    fields = json.dumps([row.id, *_values(row)], ensure_ascii=False)
    return hashlib.sha256(fields.encode()).hexdigest()[:32]


def _stale(row: UtteranceResult, source: str, text: str | None) -> bool:
    return row.source != source if row.source else row.reference != text


# ---------------------------------------------------------------------------------------------- messages


def _brief(value: Any, limit: int = 80) -> str:
    """A value for a one-line message: whole if it is a string (a path), else cut at `limit` characters."""
    text = json.dumps(value, sort_keys=True)
    return text if isinstance(value, str) or len(text) <= limit else text[: limit - 3] + "..."


def _changed_message(
    path: Path, model: str, recipe: str, dataset: str, key: str, stored: dict[str, Any], current: dict[str, Any]
) -> str:
    if key == "recipe":
        return f"{path} holds results of another recipe named {recipe!r} (on {dataset}); {FORCE_HINT}"
    if key == "code":
        return (
            f"{path} holds results of {model} {recipe} on {dataset} computed by other whisper-ptq code (a fix or "
            f"an upgrade since: transcripts may differ); {FORCE_HINT}"
        )
    if key == "versions":
        then, now = stored[key], current[key]
        changed = ", ".join(
            f"{p} {then.get(p)} then, {now.get(p)} now" for p in sorted({*then, *now}) if then.get(p) != now.get(p)
        )
        what = f"{model} {recipe} on {dataset}"
        return f"{path} holds results of {what} computed with other libraries ({changed}); {FORCE_HINT}"
    return (
        f"{path} holds results of {model} {recipe} on {dataset} computed with other {key}: "
        f"{_brief(stored[key])} then, {_brief(current[key])} now; {FORCE_HINT}"
    )


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


# ------------------------------------------------------------------------------------------- connections


def _open(path: Path, writable: bool) -> sqlite3.Connection:
    """Check what `path` is before anything could write to it (SQLite's header, then the schema), then
    connect: read-write with WAL, or read-only."""
    if not path.is_file():
        raise UserError(f"no results database at {path}")
    try:
        with open(path, "rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if not header:
        raise UserError(f"{path} is empty (0 bytes), not a whisper-ptq results database; move it away or delete it")
    if header != SQLITE_HEADER:
        raise UserError(f"{path} is corrupt or not a SQLite database (no SQLite header); move it away or delete it")
    db = sqlite3.connect(path) if writable else _connect_read_only(path)
    try:
        _check_ours(db, path)
        if writable:
            db.execute("PRAGMA journal_mode = WAL")  # readers (a report, a test) never block the writer
            db.execute("PRAGMA synchronous = FULL")  # a committed batch survives power loss, not only a kill
            db.execute("PRAGMA foreign_keys = ON")
            _migrate(db)
        elif db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            memory = sqlite3.connect(":memory:")  # migrated where reading it changes nothing on disk
            db.backup(memory)
            db.close()
            db = memory
            _migrate(db)
    except UserError:
        db.close()
        raise
    except sqlite3.Error as exc:
        db.close()
        raise UserError(f"cannot open {path}: {exc}") from None
    return db


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write. In a folder it cannot write either, SQLite cannot make the shared-memory
    file a WAL database is read through, so it is read as immutable: safe, since nothing can write there, as
    long as no write-ahead log holds commits not yet merged into the file."""
    uri = f"{path.absolute().as_uri()}?mode=ro"
    if not os.access(path.parent, os.W_OK):
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            raise UserError(f"cannot read {path}: its folder is read-only and {wal} holds writes not yet merged")
        uri += "&immutable=1"
    try:
        return sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _check_ours(db: sqlite3.Connection, path: Path) -> None:
    try:
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path} is corrupt or not a SQLite database ({exc}); move it away or delete it") from None
    if check != "ok":
        raise UserError(f"{path} is corrupt ({check}); move it away or delete it")
    if version > SCHEMA_VERSION:
        raise UserError(f"{path} was written by a newer whisper-ptq (schema version {version}); upgrade to read it")
    if version < 1 or not TABLES <= tables:
        raise UserError(f"{path} is not a whisper-ptq results database (schema version {version})")


def _migrate(db: sqlite3.Connection) -> None:
    """Apply every migration the database lacks, each in one transaction with its new version number."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for start in range(version, SCHEMA_VERSION):
        try:
            db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[start]};")
            if start == 1:
                _count_error_kinds(db)
            db.execute(f"PRAGMA user_version = {start + 1}")
            db.commit()
        except sqlite3.Error:
            if db.in_transaction:
                db.rollback()
            raise


def _count_error_kinds(db: sqlite3.Connection) -> None:
    """Substitutions, deletions and insertions of rows written before they were stored, from their texts
    (version 1 was English only); their other counts are left as written, so an altered row stays detectable."""
    cursor = db.execute("SELECT rowid, reference, hypothesis FROM utterances WHERE checksum = ''")
    counts = []
    for row_id, reference, hypothesis in cursor.fetchall():
        score = score_utterance(reference, hypothesis)
        counts.append((score.substitutions, score.deletions, score.insertions, row_id))
    db.executemany("UPDATE utterances SET substitutions = ?, deletions = ?, insertions = ? WHERE rowid = ?", counts)


def _lock(path: Path) -> int:
    """Hold the exclusive lock of the database at `path`: an open descriptor, released when it is closed or
    when the process dies. Refused, naming the holder's PID, while another process holds it."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot write to {path.parent}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = b""
        for _ in range(50):  # the holder writes its PID just after it gets the lock
            holder = os.pread(fd, 32, 0).strip()
            if holder:
                break
            time.sleep(0.01)
        os.close(fd)
        raise UserError(
            f"{path.parent} is in use by another whisper-ptq run (PID {holder.decode() or 'unknown'}); "
            "wait for it to end, or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _remove_database(path: Path) -> None:
    # "-journal" belongs to a database killed while being created, before WAL was switched on.
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
