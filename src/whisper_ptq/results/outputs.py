"""The output folder of one `eval`: summary.json (the run's figures and facts) and utterances.jsonl (its rows)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from whisper_ptq.files import atomic_write_files
from whisper_ptq.results.rows import UtteranceResult

SUMMARY_FILE = "summary.json"
UTTERANCES_FILE = "utterances.jsonl"


def write_outputs(out_dir: Path, summary: dict[str, Any], rows: Iterable[UtteranceResult]) -> None:
    """Both files at once (see `files.atomic_write_files`): an interrupted run never leaves a truncated file,
    and a summary.json always describes the utterances.jsonl beside it."""
    lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows)
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write_files(out_dir, {UTTERANCES_FILE: lines, SUMMARY_FILE: text})
