"""The local executor: each job in its own worker process on this machine, one job at a time.

A fresh process per (model, recipe) means a native abort, a segfault or the OOM killer takes down only
that job: the driver sees the process end without a `Failed` event and reports it from the exit status
and the tail of the worker's stderr, which is kept in `<out>/logs/`.

Workers import nothing from the directory bench runs in: `python -P` keeps the working directory off
`sys.path` (plain `python -m` puts it first, so a `tqdm.py` there would run), and an empty entry of
PYTHONPATH, which means the working directory too (`PYTHONPATH=$EXTRA:$PYTHONPATH` with nothing in
$PYTHONPATH), is dropped. The working directory itself stays the driver's: relative paths in the experiment
(a manifest, a model folder) mean the same to the worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from whisper_ptq.executors.jobs import Event, Failed, Job, decode_event
from whisper_ptq.settings import quiet_environment

STDERR_TAIL_LINES = 3


class LocalExecutor:
    def __init__(self, work_dir: Path):
        self.log_dir = Path(work_dir) / "logs"

    def run(self, jobs: Sequence[Job], on_event: Callable[[Event], None]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            self._run_one(job, on_event)

    def _run_one(self, job: Job, on_event: Callable[[Event], None]) -> None:
        log = self.log_dir / f"{job.index:03d}-{_slug(job.label)}.stderr"
        reported_failure = False
        with log.open("w") as stderr:
            worker = subprocess.Popen(
                [sys.executable, "-P", "-m", "whisper_ptq.executors.worker"],
                env=worker_environment(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            try:
                worker.stdin.write(json.dumps(job.to_dict()))
                worker.stdin.close()
                for line in worker.stdout:
                    event = _decode(line)
                    if event is None:
                        continue
                    reported_failure |= isinstance(event, Failed)
                    on_event(event)
                returncode = worker.wait()
            finally:
                if worker.poll() is None:  # the driver is being interrupted: take the worker down with it
                    worker.kill()
                    worker.wait()
        if returncode != 0 and not reported_failure:
            on_event(Failed(job.index, _crash_message(returncode, log)))


def worker_environment() -> dict[str, str]:
    """The driver's environment (plugins, data root, cache), without PYTHONPATH's empty entries, and with
    `settings.QUIET_LIBRARIES` unless set (a sweep started from the Python API gets clean logs too)."""
    env = quiet_environment()
    entries = [entry for entry in env.pop("PYTHONPATH", "").split(os.pathsep) if entry]
    if entries:
        env["PYTHONPATH"] = os.pathsep.join(entries)
    return env


def _decode(line: str) -> Event | None:
    """An event, or None for a line cut short by the worker dying mid-write (that batch is lost, and the
    crash is reported from the exit status)."""
    try:
        return decode_event(line)
    except (ValueError, KeyError, TypeError):
        return None


def _crash_message(returncode: int, log: Path) -> str:
    if returncode < 0:
        how = f"worker killed by {signal.Signals(-returncode).name}"
        if -returncode == signal.SIGKILL:
            how += " (out of memory?)"
    else:
        how = f"worker exited with status {returncode}"
    tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f"{how}; stderr: {' | '.join(tail[-STDERR_TAIL_LINES:])}" if tail else how


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)
