"""Executors run sweep jobs away from the driver and stream back what happens as events.

The driver (`sweep.run_sweep`) alone writes the results database; an executor only turns `Job`s into
`Event`s (see `jobs.py`). Adding an executor means one module here and one line in `EXECUTORS`. This
module stays free of heavy imports: the command line reads `EXECUTORS` for its choices.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from whisper_ptq.executors.jobs import Event, Job


class Executor(Protocol):
    """Runs jobs and calls `on_event` for each event, in the calling thread, in the order each job emitted
    them. Returns only when every job has ended, after a `Failed` event for each job that did not finish
    (a crashed worker included)."""

    def run(self, jobs: Sequence[Job], on_event: Callable[[Event], None]) -> None: ...


# name -> "module:class"; imported on use, so an optional dependency (Ray) is only needed when chosen.
EXECUTORS: dict[str, str] = {
    "local": "whisper_ptq.executors.local:LocalExecutor",
    "ray": "whisper_ptq.executors.ray:RayExecutor",
}


def make_executor(name: str, work_dir: Path, **options: Any) -> Executor:
    """The executor called `name`; `work_dir` is where it may keep logs (the sweep's output dir), `options`
    are its own settings (e.g. the Ray cluster's address)."""
    module, _, cls = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(work_dir, **options)
