"""A sweep worker: one job (model + recipe, then its dataset parts), events out as JSON lines.

Run as `python -m whisper_ptq.executors.worker`: the job arrives as one JSON document on stdin, events
leave on stdout, one per line, and everything else the process prints goes to stderr (the executor keeps
it as the job's log). `run_job` is the same work for executors that call it in-process (Ray).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import TextIO

from whisper_ptq.data import Dataset, open_dataset
from whisper_ptq.errors import one_line
from whisper_ptq.evaluation import Quantized, run_environment
from whisper_ptq.executors.jobs import Event, Failed, Finished, Job, Opened, Part, Rows, Timed, encode_event
from whisper_ptq.results.environment import peak_rss_bytes
from whisper_ptq.results.rows import UtteranceResult
from whisper_ptq.results.timing import LOAD_KEY, TimedPass


class _LoadWatch:
    """The highest 1-minute load average sampled after each batch: whether other work shared the CPU."""

    def __init__(self) -> None:
        self.highest = 0.0

    def sample(self) -> None:
        self.highest = max(self.highest, os.getloadavg()[0])


def run_job(job: Job, emit: Callable[[Event], None]) -> None:
    """Quantize once, then transcribe each part's utterances, emitting every batch as it ends (or, for a
    timing part, one `Timed` event per batch size)."""
    datasets = [open_dataset(part.dataset, job.settings.data_root) for part in job.parts]
    quantized = Quantized.build(job.model, job.recipe, job.settings, evaluated=datasets)
    emit(Opened(job.index, {**quantized.info, **run_environment()}))  # the machine it ran on, for the report
    cpus = len(os.sched_getaffinity(0))
    for part, dataset in zip(job.parts, datasets, strict=True):
        done = {u.id for u in dataset.utterances} - set(part.todo)
        if part.batch_sizes:
            for size in part.batch_sizes:
                emit(_timed_pass(job, part, quantized, dataset, done, size, cpus))
            continue
        load = _LoadWatch()

        def on_rows(rows: list[UtteranceResult], spec: str = part.dataset, load: _LoadWatch = load) -> None:
            load.sample()
            emit(Rows(job.index, spec, tuple(rows)))

        quantized.evaluate(dataset, done=done, on_rows=on_rows, progress=False)  # the driver draws the bars
        info = {"peak_rss_bytes": peak_rss_bytes(), LOAD_KEY: load.highest, "cpus": cpus}
        emit(Finished(job.index, part.dataset, info))


def _timed_pass(
    job: Job, part: Part, quantized: Quantized, dataset: Dataset, done: set[str], size: int, cpus: int
) -> Timed:
    """All of the part's utterances transcribed again at `size`, timed as the accuracy pass is (warm-up first)."""
    load = _LoadWatch()
    result = quantized.evaluate(dataset, batch_size=size, done=done, on_rows=lambda _: load.sample(), progress=False)
    timed = TimedPass(
        size,
        job.timing_round,
        sum(r.seconds for r in result.rows),
        sum(r.audio_seconds for r in result.rows),
        load.highest,
        result.info.get("threads"),
        cpus,
    )
    return Timed(job.index, part.dataset, timed.to_dict(), {r.id: r.hypothesis for r in result.rows})


def _protocol_stream() -> TextIO:
    """Keep the real stdout for events and point fd 1 at stderr, so that whatever a library prints (Python
    or native code) cannot corrupt the event stream."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return protocol


def main() -> int:
    protocol = _protocol_stream()

    def emit(event: Event) -> None:
        protocol.write(encode_event(event) + "\n")
        protocol.flush()  # the driver stores each batch as soon as it arrives

    job = Job.from_dict(json.loads(sys.stdin.read()))
    try:
        run_job(job, emit)
    except Exception as exc:  # noqa: BLE001 - any failure of the job is reported, then the worker exits
        traceback.print_exc()
        emit(Failed(job.index, one_line(exc)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
