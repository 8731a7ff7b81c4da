"""Timed passes and the RTF figures taken from them: median with min-max over passes, RTFx, and whether the
machine was busy with other work while they were timed.

A task (model x recipe x dataset) is timed once by its accuracy pass (the rows' `seconds`, at the batch size
its info records) and again by each timing pass a sweep runs after the rows are stored (`repeats`, extra batch
sizes): one entry per pass in the task's info under `TIMING_KEY`. Passes of one sweep round over several
datasets are pooled (seconds over audio seconds), so a system's RTF is one number per pass.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from whisper_ptq.results.rows import UtteranceResult

TIMING_KEY = "timing"  # task info: the timing passes, as `TimedPass.to_dict`
LOAD_KEY = "load_average_max"  # task info and passes: the highest 1-minute load average seen while timing
ACCURACY_ROUND = 0  # the round of the accuracy pass; timing rounds count from 1


@dataclass(frozen=True)
class TimedPass:
    """One timed transcription of all of a task's utterances at one batch size."""

    batch_size: int
    round: int
    seconds: float
    audio_seconds: float
    load_average: float | None = None  # the highest 1-minute load average sampled after each batch
    threads: int | None = None  # the intra-op threads the timed library used
    cpus: int | None = None  # CPUs this process could run on
    differing: int = 0  # hypotheses that differ from the stored (accuracy) ones

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "round": self.round,
            "seconds": self.seconds,
            "audio_seconds": self.audio_seconds,
            LOAD_KEY: self.load_average,
            "threads": self.threads,
            "cpus": self.cpus,
            "differing_hypotheses": self.differing,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TimedPass:
        return cls(
            data["batch_size"],
            data["round"],
            data["seconds"],
            data["audio_seconds"],
            data.get(LOAD_KEY),
            data.get("threads"),
            data.get("cpus"),
            data.get("differing_hypotheses", 0),
        )

    @property
    def busy(self) -> bool:
        """Whether other work competed for the CPU: the load average (which counts this pass's own threads)
        exceeded the threads in use, and the CPUs too (below the CPU count, others ran on idle cores)."""
        if self.load_average is None or self.threads is None:
            return False
        return self.load_average > max(self.threads, self.cpus or 0)


def task_passes(rows: Sequence[UtteranceResult], info: dict[str, Any]) -> list[TimedPass]:
    """Every timed pass of one task: the accuracy pass (from its rows), then the stored timing passes."""
    passes = [TimedPass.from_dict(p) for p in info.get(TIMING_KEY) or []]
    if rows and info.get("batch_size"):
        accuracy = TimedPass(
            int(info["batch_size"]),
            ACCURACY_ROUND,
            sum(r.seconds for r in rows),
            sum(r.audio_seconds for r in rows),
            info.get(LOAD_KEY),
            info.get("threads"),
            info.get("cpus"),
        )
        passes.insert(0, accuracy)
    return passes


@dataclass(frozen=True)
class Speed:
    """RTF over the passes at one batch size, pooled over datasets: one value per pass, in round order."""

    batch_size: int
    rtfs: tuple[float, ...]
    rounds: tuple[int, ...]  # the sweep round of each RTF
    busy: int  # passes timed while the machine was busy (see `TimedPass.busy`)
    load_average: float | None  # the highest load average of any of these passes
    threads: int | None
    cpus: int | None
    differing: int  # hypotheses of timing passes that differed from the stored ones

    @property
    def median(self) -> float:
        return statistics.median(self.rtfs) if self.rtfs else math.nan

    @property
    def low(self) -> float:
        return min(self.rtfs, default=math.nan)

    @property
    def high(self) -> float:
        return max(self.rtfs, default=math.nan)

    @property
    def rtfx(self) -> float:
        """Audio seconds transcribed per second (1 / RTF), the Open ASR Leaderboard's figure."""
        return 1.0 / self.median if self.median else math.nan

    @property
    def passes(self) -> int:
        return len(self.rtfs)


def pooled_speeds(tasks: Iterable[Sequence[TimedPass]]) -> dict[int, Speed]:
    """Batch size -> Speed over the passes of several tasks (a system's datasets). A round counts only if
    every task has it, so each pooled RTF covers the same audio."""
    tasks = [list(t) for t in tasks if t]
    by_round: dict[tuple[int, int], list[TimedPass]] = {}
    for passes in tasks:
        for p in passes:
            by_round.setdefault((p.batch_size, p.round), []).append(p)
    complete = {key: ps for key, ps in sorted(by_round.items()) if len(ps) == len(tasks)}
    speeds: dict[int, Speed] = {}
    for size in dict.fromkeys(b for b, _ in complete):
        rounds = [ps for (b, _), ps in complete.items() if b == size]
        rtfs = tuple(sum(p.seconds for p in ps) / sum(p.audio_seconds for p in ps) for ps in rounds)
        flat = [p for ps in rounds for p in ps]
        loads = [p.load_average for p in flat if p.load_average is not None]
        speeds[size] = Speed(
            size,
            rtfs,
            tuple(r for b, r in complete if b == size),
            sum(any(p.busy for p in ps) for ps in rounds),
            max(loads, default=None),
            next((p.threads for p in flat if p.threads is not None), None),
            next((p.cpus for p in flat if p.cpus is not None), None),
            sum(p.differing for p in flat),
        )
    return speeds


def speedup(baseline: Speed, other: Speed) -> float:
    """How many times faster `other` ran than `baseline`: the median over the rounds both were timed in of the
    ratio of their RTFs (the two passes of a round ran close in time, so a slow spell of the machine cancels
    out); the ratio of the medians when they share no round."""
    base = dict(zip(baseline.rounds, baseline.rtfs, strict=True))
    ratios = [base[r] / rtf for r, rtf in zip(other.rounds, other.rtfs, strict=True) if r in base and rtf]
    if ratios:
        return statistics.median(ratios)
    return baseline.median / other.median if other.median else math.nan
