"""How an evaluation runs: everything except what is evaluated. Plain data, shared by the command line, the
evaluation, the sweep's jobs and its driver (which must not import the model stack)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from whisper_ptq.errors import UserError
from whisper_ptq.models.names import LANGUAGES

DEFAULT_CALIBRATION = "librispeech:train-clean-100"
TASKS = ("transcribe", "translate")
AUTO = "auto"  # --language auto: detected on each recording's first 30 s


@dataclass(frozen=True)
class DecodingOptions:
    """How Whisper decodes (`engines.decoding` runs it, the same in every engine). Part of a run's identity:
    recorded with every run, and in an experiment's config (so a beam-5 sweep never resumes greedy rows)."""

    language: str = "en"  # a Whisper language code, or "auto"
    task: str = "transcribe"
    beam_size: int = 1
    temperature_fallback: bool = False  # OpenAI's: re-decode a window at 0.2 ... 1.0 when repetitive or improbable
    condition_on_previous_text: bool = False  # long form: prompt each window with the text before it

    def __post_init__(self) -> None:
        if self.language != AUTO and self.language not in LANGUAGES:
            raise UserError(
                f"language must be a Whisper language code (en, de, fr, zh, ...) or {AUTO!r}, got {self.language!r}",
                param="language",
            )
        if self.task not in TASKS:
            raise UserError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}", param="task")
        if not _is_count(self.beam_size):
            raise UserError(f"beam_size must be an integer of at least 1, got {self.beam_size!r}", param="beam_size")
        for name in ("temperature_fallback", "condition_on_previous_text"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}", param=name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults (an experiment's config holds only these, so databases
        written before decoding options existed keep their identity)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def identify(self, config: dict[str, Any]) -> dict[str, Any]:
        """A study's results-database identity with these options in it (only when not the defaults)."""
        return {**config, "decoding": self.changed()} if self.changed() else config

    def check_model(self, english_only: bool, model: str) -> None:
        """Refuse what an English-only (.en) model cannot do."""
        if english_only and self.language not in ("en", AUTO):
            raise UserError(
                f"model {model} is English-only: language {self.language!r} needs a multilingual model",
                param="language",
            )
        if english_only and self.task != "transcribe":
            raise UserError(
                f"model {model} is English-only: it cannot {self.task}; use a multilingual model", param="task"
            )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# Our own progress bars and one-line summaries are the output; transformers' load bars and deprecation chatter
# would bury them, and in a sweep worker's log they would hide the lines that explain a failure. Read when
# transformers is first imported, so they are set before (the command line, each worker's environment).
QUIET_LIBRARIES = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_environment() -> dict[str, str]:
    """This process's environment with `QUIET_LIBRARIES` where the user set nothing else: for worker processes."""
    return {**QUIET_LIBRARIES, **os.environ}


@dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    batch_size: int = 1
    threads: int | None = None
    data_root: Path | None = None
    cache_dir: Path | None = None
    calibration: str = DEFAULT_CALIBRATION
    calibration_limit: int = 32
    progress: bool = True
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def __post_init__(self) -> None:
        for name in ("batch_size", "threads", "calibration_limit"):
            value = getattr(self, name)
            if value is not None and not _is_count(value):
                raise UserError(f"{name} must be an integer of at least 1, got {value!r}", param=name)
