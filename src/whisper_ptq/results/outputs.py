"""The output folder of one `eval`: summary.json (the run's figures and facts) and utterances.jsonl (its rows,
each with its reference and hypothesis as the Whisper normalizer scored them)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from whisper_ptq.errors import UserError
from whisper_ptq.files import atomic_write_files
from whisper_ptq.results.metrics import normalize
from whisper_ptq.results.rows import UtteranceResult

SUMMARY_FILE = "summary.json"
UTTERANCES_FILE = "utterances.jsonl"
ROW_KEYS = tuple(f.name for f in fields(UtteranceResult))


def write_outputs(out_dir: Path, summary: dict[str, Any], rows: Iterable[UtteranceResult]) -> None:
    """Both files at once (see `files.atomic_write_files`): an interrupted run never leaves a truncated file,
    and a summary.json always describes the utterances.jsonl beside it."""
    lines = "".join(json.dumps(_line(r), ensure_ascii=False) + "\n" for r in rows)
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write_files(out_dir, {UTTERANCES_FILE: lines, SUMMARY_FILE: text})


def _line(row: UtteranceResult) -> dict[str, Any]:
    return {
        **row.to_dict(),
        "normalized_reference": normalize(row.reference),
        "normalized_hypothesis": normalize(row.hypothesis),
    }


def is_output_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file() and (path / UTTERANCES_FILE).is_file()


def read_outputs(out_dir: Path) -> tuple[dict[str, Any], list[UtteranceResult]]:
    """The summary and rows an `eval` wrote; one stored before the normalized texts existed reads the same."""
    where = out_dir / UTTERANCES_FILE
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        lines = where.read_text(encoding="utf-8").splitlines()
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{out_dir} is not a readable eval output folder: {exc}") from None
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rows.append(UtteranceResult(**{key: entry[key] for key in ROW_KEYS}))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{where}:{lineno}: not an utterance row ({exc})") from None
    return summary, rows
