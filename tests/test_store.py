"""The results database: identity of the experiment, idempotent rows, recomputed summaries, refusals."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import replace

import pytest

from whisper_ptq.errors import UserError
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.rows import UtteranceResult, summarize
from whisper_ptq.results.store import SCHEMA_V1, Store, config_hash

CONFIG = {"name": "t", "recipes": ["fp32"], "datasets": ["librispeech:test-clean"], "limit": 2}
FP32 = Recipe(name="fp32", library="reference", scheme="reference", weights="fp32", granularity="per-tensor")


def row(utt_id: str, hypothesis: str = "a b", word_errors: int = 0) -> UtteranceResult:
    return UtteranceResult(utt_id, "a b", hypothesis, 2, word_errors, 3, word_errors, 2.0, 0.5)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "results.sqlite"


def test_rows_are_stored_once_and_summaries_recomputed(db):
    with Store.create(db, "t", CONFIG) as store:
        task = store.ensure_task(0, "tiny.en", FP32, "librispeech:test-clean")
        assert store.ensure_task(0, "tiny.en", FP32, "librispeech:test-clean") == task
        store.merge_info(task, {"size_bytes": 10, "calibration_dataset": None})
        store.set_status(task, "running")
        store.add_rows(task, [row("u2", "a", 1), row("u1")])
        store.add_rows(task, [row("u2", "different"), row("u3")])  # u2 again: the first copy stays
        [result] = store.results()
    assert result["status"] == "partial" and result["error"] is None
    assert [u["id"] for u in result["utterances"]] == ["u1", "u2", "u3"]
    assert result["utterances"][1]["hypothesis"] == "a"
    rows = [UtteranceResult(**u) for u in result["utterances"]]
    assert result["summary"] == {"size_bytes": 10, "calibration_dataset": None, **summarize(rows)}
    assert result["recipe_spec"] == FP32.to_dict()


def test_reopened_database_keeps_experiment_and_tasks(db):
    Store.create(db, "t", CONFIG).close()
    with Store.for_experiment(db, "t", CONFIG) as store:
        assert store.experiment.config == CONFIG and store.experiment.config_hash == config_hash(CONFIG)
        task = store.ensure_task(0, "tiny.en", FP32, "d")
        store.set_status(task, "failed", "boom")
        [result] = store.results()
    assert (result["status"], result["error"], result["summary"]) == ("failed", "boom", {})


def test_a_recipe_redefined_under_its_name_never_reuses_the_old_rows(db):
    """Same name, other definition (a search's mix chosen again, an edited recipe file): its stored rows
    belong to another recipe. Refused; or, where asked, the old task is dropped with its rows."""
    redefined = replace(FP32, description="another recipe under the same name")
    with Store.create(db, "t", CONFIG) as store:
        old = store.ensure_task(0, "tiny.en", FP32, "d")
        store.add_rows(old, [row("u1")])
        with pytest.raises(UserError, match="another recipe named 'fp32'.*--force"):
            store.ensure_task(0, "tiny.en", redefined, "d")
        new = store.ensure_task(0, "tiny.en", redefined, "d", replace_changed=True)
        assert store.rows(new) == [] and store.done_ids(new) == set()
        [result] = store.results()
    assert result["recipe_spec"] == redefined.to_dict() and result["utterances"] == []


def test_a_different_experiment_is_refused_unless_forced(db):
    with Store.create(db, "t", CONFIG) as store:
        store.add_rows(store.ensure_task(0, "tiny.en", FP32, "d"), [row("u1")])
    other = {**CONFIG, "limit": 3}
    with pytest.raises(UserError, match="different experiment.*--force"):
        Store.for_experiment(db, "t", other)
    with Store.for_experiment(db, "t", other, force=True) as store:
        assert store.experiment.config == other and store.results() == []


@pytest.mark.parametrize("force", [False, True])
def test_a_corrupt_database_is_refused_and_left_alone(db, force):
    garbage = os.urandom(8192)
    db.write_bytes(garbage)
    with pytest.raises(UserError, match="corrupt or not a SQLite database"):
        Store.for_experiment(db, "t", CONFIG, force=force)
    assert db.read_bytes() == garbage


def test_another_sqlite_file_is_not_taken_for_ours(db):
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(UserError, match="not a whisper-ptq results database"):
        Store.open(db)


def test_a_creation_killed_midway_leaves_nothing_in_the_way(db):
    (db.parent / f".{db.name}.creating").write_bytes(b"half a database")
    with Store.for_experiment(db, "t", CONFIG) as store:
        assert store.experiment.name == "t"


def test_a_version_1_row_gets_its_error_kinds_language_and_decoded_seconds(db):
    """A database written before rows had S/D/I, language, token limit and decoded seconds still resumes: its
    rows' error kinds are counted from their texts, and its engines decoded at most 30 s."""
    old = sqlite3.connect(db)
    old.executescript(SCHEMA_V1)
    old.execute(
        "INSERT INTO experiment VALUES (1, 't', ?, ?, '2025-01-01T00:00:00+00:00')",
        (json.dumps(CONFIG, sort_keys=True), config_hash(CONFIG)),
    )
    old.execute(
        "INSERT INTO tasks (position, model, recipe, recipe_spec, dataset, status) VALUES (0, 'tiny.en', 'fp32', ?, "
        "'librispeech:test-clean', 'running')",
        (json.dumps(FP32.to_dict()),),
    )
    old.execute(
        "INSERT INTO utterances (task_id, utterance_id, reference, hypothesis, ref_words, word_errors, ref_chars, "
        "char_errors, audio_seconds, seconds) VALUES (1, 'u1', 'a b c', 'a x c d', 3, 2, 5, 3, 34.0, 1.0)"
    )
    old.commit()
    old.close()
    with Store.open(db) as store:
        [stored] = store.rows(1)
        store.add_rows(1, [replace(row("u2"), language="de", hit_token_limit=True, decoded_seconds=2.0)])
        rows = store.rows(1)
    assert (stored.substitutions, stored.deletions, stored.insertions) == (1, 0, 1)
    assert stored.decoded == 30.0 and stored.language == "en" and stored.hit_token_limit is False
    assert rows[1].language == "de" and rows[1].hit_token_limit is True and rows[1].decoded == 2.0
