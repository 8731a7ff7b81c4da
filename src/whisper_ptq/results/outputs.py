"""The output folder of one `eval`: summary.json (the run's figures and facts) and utterances.jsonl (its rows),
and the strict JSON every output file is written in."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from whisper_ptq.files import atomic_write_files
from whisper_ptq.results.rows import UtteranceResult

SUMMARY_FILE = "summary.json"
UTTERANCES_FILE = "utterances.jsonl"


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
    lines = "".join(strict_json(r.to_dict()) + "\n" for r in rows)
    atomic_write_files(out_dir, {UTTERANCES_FILE: lines, SUMMARY_FILE: strict_json(summary, indent=2) + "\n"})
