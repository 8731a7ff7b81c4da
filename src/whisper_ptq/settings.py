"""How an evaluation runs: everything except what is evaluated. Plain data, shared by the command line, the
evaluation, the sweep's jobs and its driver (which must not import the model stack)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from whisper_ptq.errors import UserError

DEFAULT_CALIBRATION = "librispeech:train-clean-100"
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

    def __post_init__(self) -> None:
        for name in ("batch_size", "threads", "calibration_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(f"{name} must be an integer of at least 1, got {value!r}", param=name)
