"""The output folder of one `eval`: summary.json (the run's figures and facts) and utterances.jsonl (its rows,
each with its reference and hypothesis as the Whisper normalizer scored them), and the strict JSON every output
file is written in."""

from __future__ import annotations

import json
import math
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


def strict_json(value: Any, indent: int | None = None) -> str:
    """JSON any parser reads: a figure that is not a number (NaN: a rate over nothing) is written as null, never
    as Python's NaN, which is not JSON; what JSON has no type for (a path) is written as its text."""
    return json.dumps(_finite(value), indent=indent, default=str, ensure_ascii=False, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def write_outputs(out_dir: Path, summary: dict[str, Any], rows: Iterable[UtteranceResult]) -> None:
    """Both files at once (see `files.atomic_write_files`): an interrupted run never leaves a truncated file,
    and a summary.json always describes the utterances.jsonl beside it."""
    lines = "".join(strict_json(_line(r)) + "\n" for r in rows)
    atomic_write_files(out_dir, {UTTERANCES_FILE: lines, SUMMARY_FILE: strict_json(summary, indent=2) + "\n"})


def _line(row: UtteranceResult) -> dict[str, Any]:
    return {
        **row.to_dict(),
        "normalized_reference": normalize(row.reference, row.language),
        "normalized_hypothesis": normalize(row.hypothesis, row.language),
    }


def is_output_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file() and (path / UTTERANCES_FILE).is_file()


def read_outputs(out_dir: Path) -> tuple[dict[str, Any], list[UtteranceResult]]:
    """The summary and rows an `eval` wrote; one written before a row field existed reads with its default."""
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
            rows.append(UtteranceResult(**{key: entry[key] for key in ROW_KEYS if key in entry}))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{where}:{lineno}: not an utterance row ({exc})") from None
    return summary, rows
