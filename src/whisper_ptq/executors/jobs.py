"""What executors carry: jobs going out to workers and events coming back, with their JSON form.

A job is one (model, recipe) with the dataset parts it still has to do, each part a fixed list of utterance
ids, so a job can be split into shards (the Ray executor's unit) and a retried shard recomputes exactly its
utterances. Events name their job by index and their part by dataset spec, so the driver can route them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from whisper_ptq.recipes import Recipe
from whisper_ptq.results.rows import UtteranceResult
from whisper_ptq.settings import DecodingOptions, Settings


@dataclass(frozen=True)
class Part:
    """Utterances of one dataset (canonical spec) that a job must transcribe. A timing part (`batch_sizes`
    set) transcribes all of a task's stored utterances again, one timed pass per batch size, and stores no rows."""

    dataset: str
    todo: tuple[str, ...]
    batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Job:
    """One model quantized by one recipe (loaded once), then evaluated on each part in order."""

    index: int  # position in the sweep's job list; every event names it
    model: str
    recipe: Recipe
    parts: tuple[Part, ...]
    settings: Settings
    timing_round: int = 0  # 0: an accuracy job; n: the sweep's n-th round of timing passes

    @property
    def label(self) -> str:
        timing = f" timing {self.timing_round}" if self.timing_round else ""
        return f"{self.model} {self.recipe.name}{timing}"

    def shards(self, size: int) -> list[Job]:
        """The job cut into jobs of one part and at most `size` utterances each, keeping its index (events
        still route to its tasks). Each shard's ids are fixed, so a shard run again recomputes exactly them.
        A timing part stays whole: its pass is timed over all of its utterances."""
        shards = []
        for part in self.parts:
            step = max(1, len(part.todo)) if part.batch_sizes else size
            cuts = range(0, len(part.todo), step)
            shards += [replace(self, parts=(replace(part, todo=part.todo[start : start + step]),)) for start in cuts]
        return shards

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        for key in ("data_root", "cache_dir"):
            settings[key] = None if settings[key] is None else str(settings[key])
        return {
            "index": self.index,
            "model": self.model,
            "recipe": self.recipe.to_dict(),
            "parts": [asdict(p) for p in self.parts],
            "settings": settings,
            "timing_round": self.timing_round,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        settings = dict(data["settings"])
        for key in ("data_root", "cache_dir"):
            settings[key] = None if settings[key] is None else Path(settings[key])
        settings["decoding"] = DecodingOptions(**settings.get("decoding", {}))
        return cls(
            index=data["index"],
            model=data["model"],
            recipe=Recipe.from_dict(data["recipe"]),
            parts=tuple(Part(p["dataset"], tuple(p["todo"]), tuple(p.get("batch_sizes", ()))) for p in data["parts"]),
            settings=Settings(**settings),
            timing_round=data.get("timing_round", 0),
        )


# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class Opened:
    """The model is loaded and quantized; `info` is `Quantized.info` (size, recipe, threads...)."""

    job: int
    info: dict[str, Any]


@dataclass(frozen=True)
class Rows:
    """One transcribed batch of a part."""

    job: int
    dataset: str
    rows: tuple[UtteranceResult, ...]


@dataclass(frozen=True)
class Finished:
    """A part ended normally; `info` holds what is only known at its end (peak memory)."""

    job: int
    dataset: str
    info: dict[str, Any]


@dataclass(frozen=True)
class Timed:
    """One timing pass of a part ended: `info` is `results.timing.TimedPass.to_dict()` without the comparison
    with the stored rows, which the driver makes from `hypotheses` (utterance id -> text)."""

    job: int
    dataset: str
    info: dict[str, Any]
    hypotheses: dict[str, str]


@dataclass(frozen=True)
class Failed:
    """The job (or, when `dataset` is set, only that part) failed; `error` is one line."""

    job: int
    error: str
    dataset: str | None = None


Event = Opened | Rows | Finished | Timed | Failed
EVENT_TYPES: dict[str, type[Event]] = {cls.__name__.lower(): cls for cls in (Opened, Rows, Finished, Timed, Failed)}


def encode_event(event: Event) -> str:
    """One JSON line (no newline); `default=str` because backends may put paths or dtypes in their info."""
    return json.dumps({"type": type(event).__name__.lower(), **asdict(event)}, default=str)


def decode_event(line: str) -> Event:
    data = json.loads(line)
    cls = EVENT_TYPES[data.pop("type")]
    if cls is Rows:
        data["rows"] = tuple(UtteranceResult(**row) for row in data["rows"])
    return cls(**data)
