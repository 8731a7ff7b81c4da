"""The bench sweep: an experiment (TOML file or preset) run as models x recipes x datasets tasks.

Everything is validated before anything runs: the file's keys and types, every recipe, model and dataset
(and the calibration set when a static recipe will run). Then each (model, recipe) becomes one job for an
executor (one worker process each, locally), while this process, the driver, alone writes the results
database from the events the jobs stream back. What the database already holds is not run again, so a
re-run into the same directory resumes an interrupted sweep and a finished one costs nothing; only one run
at a time writes a directory (the database's lock). What the database holds is reused only when computed
from the same model, data and audio as now (`studies.identity`, `Dataset.fingerprint`); rows of changed audio
or text are computed again, and a row a worker computed from other data than the driver sees is not stored.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from whisper_ptq.backends import backend_for, get_recipe, library_packages
from whisper_ptq.data import open_dataset, resolve_data_root
from whisper_ptq.data.datasets import calibration_dataset
from whisper_ptq.data.specs import dataset_label, parse_dataset_spec
from whisper_ptq.errors import UserError
from whisper_ptq.executors import make_executor
from whisper_ptq.executors.jobs import Event, Failed, Finished, Job, Opened, Part, Rows, Timed
from whisper_ptq.models.sources import default_cache_dir
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.environment import environment
from whisper_ptq.results.rows import UtteranceResult
from whisper_ptq.results.store import RESULTS_FILE, Store
from whisper_ptq.results.timing import ACCURACY_ROUND, TIMING_KEY, Speed, TimedPass, pooled_speeds, task_passes
from whisper_ptq.settings import Settings
from whisper_ptq.studies.experiment import UNMEASURED, Experiment
from whisper_ptq.studies.identity import model_content, run_identity

# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Task:
    """One model x recipe x dataset cell of the sweep."""

    position: int
    model: str
    recipe: Recipe
    dataset: str  # canonical spec
    ids: tuple[str, ...]  # the utterances it evaluates, in dataset order
    skip: str | None  # why the recipe cannot run here; None when it can
    identity: dict[str, Any] = field(default_factory=dict, compare=False)  # `run_identity`
    # utterance id -> (`Dataset.fingerprint`, reference text): what each row must be computed from
    expected: dict[str, tuple[str, str | None]] = field(default_factory=dict, compare=False, repr=False)


def plan(experiment: Experiment, settings: Settings) -> list[Task]:
    """All tasks in experiment order (models x recipes x datasets, the fp32 baseline first), after
    validating every name: nothing has run when this raises."""
    try:
        models = {model: model_content(model, settings.cache_dir) for model in _unique(experiment.models, "model")}
        recipes = _baseline_first([get_recipe(text) for text in _unique(experiment.recipes, "recipe")])
        datasets = [
            open_dataset(spec, settings.data_root).limit(experiment.limit) for spec in experiment.dataset_specs()
        ]
        _unique([d.spec for d in datasets], "dataset")
        unscorable = next((d.spec for d in datasets if not d.has_transcripts), None)
        if unscorable:
            raise UserError(f"dataset {unscorable!r} has no transcripts: it can only be used for calibration")
        skips = {r.name: backend_for(r).check(r, settings.device) for r in recipes}
        if any(r.needs_calibration and not skips[r.name] for r in recipes):
            calibration_dataset(settings, datasets)
    except UserError as exc:
        raise UserError(f"{experiment.source or experiment.name}: {exc}") from None
    expected = {d.spec: {u.id: (d.fingerprint(u), u.text) for u in d.utterances} for d in datasets}
    cells = [(m, r, d) for m in experiment.models for r in recipes for d in datasets]
    return [
        Task(
            i,
            model,
            recipe,
            dataset.spec,
            tuple(u.id for u in dataset.utterances),
            skips[recipe.name],
            run_identity(models[model], recipe, dataset, settings),
            expected[dataset.spec],
        )
        for i, (model, recipe, dataset) in enumerate(cells)
    ]


def _unique(items: Sequence[str], what: str) -> Sequence[str]:
    twice = next((item for i, item in enumerate(items) if item in items[:i]), None)
    if twice is not None:
        raise UserError(f"{what} {twice!r} is listed twice")
    return items


def _baseline_first(recipes: list[Recipe]) -> list[Recipe]:
    # The report and the terminal table compare every recipe with the fp32 reference; running it first
    # also gives the earliest useful partial result.
    return sorted(recipes, key=lambda r: not r.is_baseline)


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class SweepOptions:
    out_dir: Path
    data_root: Path | None = None
    cache_dir: Path | None = None
    executor: str = "local"
    force: bool = False
    progress: bool = True
    executor_options: dict[str, Any] = field(default_factory=dict)  # the executor's own, e.g. Ray's address


@dataclass(frozen=True)
class SweepResult:
    results: list[dict[str, Any]]  # Store.results()
    jobs: int  # worker jobs this run started (0: the database already held everything)


def run_sweep(experiment: Experiment, options: SweepOptions) -> SweepResult:
    """The accuracy jobs (what the database lacks), then the rounds of timing passes that `repeats` and
    `timing_batch_sizes` ask for (see `_timing_rounds`)."""
    # Absolute paths: a worker, local or on another node, reads exactly what the driver checked.
    data_root = resolve_data_root(options.data_root).absolute()
    settings = experiment.settings(data_root, default_cache_dir(options.cache_dir).absolute())
    tasks = plan(experiment, settings)
    try:
        options.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {options.out_dir}: {exc.strerror}") from None
    with Store.for_experiment(
        options.out_dir / RESULTS_FILE, experiment.name, experiment.config(), options.force, UNMEASURED
    ) as store:
        # The driver's machine and settings; each task's info also carries its worker's own environment.
        env_id = store.record_environment(
            {
                **environment(library_packages()),
                "device": settings.device,
                "threads": settings.threads,  # None: each library's default
                "batch_size": settings.batch_size,
                "executor": options.executor,
                "argv": sys.argv,
            }
        )
        task_ids = {
            task: store.ensure_task(task.position, task.model, task.recipe, task.dataset, task.identity)
            for task in tasks
        }
        jobs = _jobs(tasks, task_ids, store, settings)
        recorder = _Recorder(store, env_id, jobs, tasks, task_ids, options.progress)
        if jobs:
            make_executor(options.executor, options.out_dir, **options.executor_options).run(jobs, recorder)
        recorder.close()
        timed = _timing_rounds(experiment, options, settings, store, tasks, task_ids)
        return SweepResult(store.results(), len(jobs) + timed)


def _jobs(tasks: list[Task], task_ids: dict[Task, int], store: Store, settings: Settings) -> list[Job]:
    """The work still to do, one job per (model, recipe); settles the tasks that need none. Stored rows whose
    audio or reference text has changed since, or whose utterance the dataset no longer lists, are dropped
    (and said so) to be computed again."""
    parts: dict[tuple[str, Recipe], list[Part]] = {}
    for task in tasks:
        task_id = task_ids[task]
        stale = store.drop_stale(task_id, task.expected)
        if stale:
            tqdm.write(
                f"{task.model} {task.recipe.name} {dataset_label(task.dataset)}: {len(stale)} stored rows were "
                f"computed from other audio or text than the dataset holds now ({', '.join(stale[:3])}"
                f"{', ...' if len(stale) > 3 else ''}): computing them again",
                file=sys.stderr,
            )
        stored = store.done_ids(task_id)
        todo = tuple(i for i in task.ids if i not in stored)
        if not todo:
            if store.status(task_id) != "done":  # killed between its last batch and its end
                store.set_status(task_id, "done")
        elif task.skip:
            store.set_status(task_id, "skipped", task.skip)
        else:
            store.set_status(task_id, "pending")  # clears the error of an earlier failed attempt
            parts.setdefault((task.model, task.recipe), []).append(Part(task.dataset, todo))
    return [Job(i, model, recipe, tuple(ps), settings) for i, ((model, recipe), ps) in enumerate(parts.items())]


def _timing_rounds(
    experiment: Experiment,
    options: SweepOptions,
    settings: Settings,
    store: Store,
    tasks: list[Task],
    task_ids: dict[Task, int],
) -> int:
    """Time every completed task again until it has `repeats` passes at each batch size (its accuracy pass
    is the first at `batch_size`), over the same utterances, and return the jobs started.

    A round holds one timing job per (model, recipe), run in experiment order, and every round ends before
    the next starts: recipes are interleaved pass by pass (A B C, A B C, ...), so a slow spell of a shared
    machine hits one pass of some recipes, not every pass of one, and the median over passes discards it.
    Each job loads and quantizes its model afresh, in its own worker, as the accuracy job did.
    """
    sizes = list(dict.fromkeys([settings.batch_size, *experiment.timing_batch_sizes]))
    failed: set[tuple[str, Recipe]] = set()  # systems whose timing failed in this run: not tried again
    started = 0
    while True:
        jobs = _timing_jobs(tasks, task_ids, store, settings, sizes, experiment.repeats, failed)
        if not jobs:
            return started
        recorder = _TimingRecorder(store, jobs, task_ids, tasks, failed, options.progress)
        make_executor(options.executor, options.out_dir, **options.executor_options).run(jobs, recorder)
        recorder.close()
        started += len(jobs)


def _timing_jobs(
    tasks: list[Task],
    task_ids: dict[Task, int],
    store: Store,
    settings: Settings,
    sizes: list[int],
    repeats: int,
    failed: set[tuple[str, Recipe]],
) -> list[Job]:
    """The next round: for each (model, recipe), a part per completed task short of passes at some size."""
    parts: dict[tuple[str, Recipe], list[Part]] = {}
    last_round = ACCURACY_ROUND
    for task in tasks:
        if store.status(task_ids[task]) != "done" or (task.model, task.recipe) in failed:
            continue
        passes = [TimedPass.from_dict(p) for p in store.info(task_ids[task]).get(TIMING_KEY) or []]
        last_round = max([last_round, *(p.round for p in passes)])
        counts = {size: sum(p.batch_size == size for p in passes) + (size == settings.batch_size) for size in sizes}
        short = tuple(size for size in sizes if counts[size] < repeats)
        if short:
            parts.setdefault((task.model, task.recipe), []).append(Part(task.dataset, task.ids, short))
    return [
        Job(i, model, recipe, tuple(ps), settings, timing_round=last_round + 1)
        for i, ((model, recipe), ps) in enumerate(parts.items())
    ]


class _TimingRecorder:
    """The driver's handler of a timing round: each pass joins its task's info, checked against the stored
    hypotheses; a failed job marks its tasks' timing as failed, never the tasks themselves."""

    def __init__(
        self,
        store: Store,
        jobs: list[Job],
        task_ids: dict[Task, int],
        tasks: list[Task],
        failed: set[tuple[str, Recipe]],
        progress: bool,
    ):
        self.store, self.failed = store, failed
        by_cell = {(t.model, t.recipe, t.dataset): task_ids[t] for t in tasks}
        self.jobs = {j.index: j for j in jobs}
        self.parts = {(j.index, p.dataset): by_cell[j.model, j.recipe, p.dataset] for j in jobs for p in j.parts}
        self.pending = {(j.index, p.dataset): len(p.batch_sizes) for j in jobs for p in j.parts}
        self.bar = tqdm(
            total=sum(self.pending.values()),
            desc=f"timing round {jobs[0].timing_round}",
            unit="pass",
            position=0,
            disable=not progress,
        )

    def __call__(self, event: Event) -> None:
        match event:
            case Timed(job=job, dataset=dataset, info=info, hypotheses=hypotheses):
                task_id = self.parts[job, dataset]
                stored = {row.id: row.hypothesis for row in self.store.rows(task_id)}
                info = {**info, "differing_hypotheses": sum(stored.get(i) != h for i, h in hypotheses.items())}
                passes = [*(self.store.info(task_id).get(TIMING_KEY) or []), info]
                self.store.merge_info(task_id, {TIMING_KEY: passes, "timing_error": None})
                self.pending[job, dataset] -= 1
                self.bar.update(1)
            case Failed(job=job, error=error, dataset=dataset):
                self._fail(job, error, dataset)

    def _fail(self, job: int, error: str, dataset: str | None = None) -> None:
        unfinished = [key for key, left in self.pending.items() if key[0] == job and dataset in (None, key[1]) and left]
        if not unfinished:
            return
        tqdm.write(f"{self.jobs[job].label}: failed: {error}", file=sys.stderr)
        self.failed.add((self.jobs[job].model, self.jobs[job].recipe))
        for key in unfinished:
            self.store.merge_info(self.parts[key], {"timing_error": error})
            self.pending[key] = 0

    def close(self) -> None:
        for job in self.jobs:
            self._fail(job, "worker ended before its timing passes finished")
        self.bar.close()


class _Recorder:
    """The driver's event handler: writes each event to the database and moves the progress bars."""

    def __init__(
        self,
        store: Store,
        environment_id: int,
        jobs: list[Job],
        tasks: list[Task],
        task_ids: dict[Task, int],
        progress: bool,
    ):
        self.store, self.environment_id, self.progress = store, environment_id, progress
        by_cell = {(t.model, t.recipe, t.dataset): (task_ids[t], len(t.ids)) for t in tasks}
        self.expected = {task_ids[t]: t.expected for t in tasks}
        # (job index, dataset) -> (task id, utterances the task has in all)
        self.parts = {(j.index, p.dataset): by_cell[j.model, j.recipe, p.dataset] for j in jobs for p in j.parts}
        self.todo = {(j.index, p.dataset): len(p.todo) for j in jobs for p in j.parts}
        self.labels = {j.index: j.label for j in jobs}
        self.sweep_bar = tqdm(
            total=len(tasks),
            initial=len(tasks) - len(self.parts),
            desc="sweep",
            unit="task",
            position=0,
            disable=not progress,
        )
        self.task_bar: tqdm | None = None
        self.task_bar_key: tuple[int, str] | None = None

    def __call__(self, event: Event) -> None:
        match event:
            case Opened(job=job, info=info):
                for task_id in self._task_ids(job):
                    self.store.merge_info(task_id, info)
                    self.store.set_status(task_id, "running", environment_id=self.environment_id)
            case Rows(job=job, dataset=dataset, rows=rows):
                task_id = self.parts[job, dataset][0]
                expected = self.expected[task_id]
                # A worker elsewhere may see another copy of the data, or a file may change during the run.
                other = [r.id for r in rows if r.source != expected[r.id][0]]
                self.store.add_rows(task_id, [r for r in rows if r.id not in other], self.environment_id)
                self._bar(job, dataset).update(len(rows))
                if other and self.store.status(task_id) in ("pending", "running"):
                    self._end(
                        task_id,
                        "failed",
                        f"utterance {other[0]} was read from other audio or text by the worker than by the driver "
                        "(changed during the run, or another copy of the data); not stored",
                    )
            case Finished(job=job, dataset=dataset, info=info):
                task_id, total = self.parts[job, dataset]
                self.store.merge_info(task_id, info)
                if len(self.store.done_ids(task_id)) == total:
                    self._end(task_id, "done")
            case Failed(job=job, error=error, dataset=dataset):
                unfinished = self._task_ids(job, dataset)
                if unfinished:
                    tqdm.write(f"{self.labels[job]}: failed: {error}", file=sys.stderr)
                for task_id in unfinished:
                    self._end(task_id, "failed", error)

    def close(self) -> None:
        """Fail what an executor left unfinished without saying why (it should not happen)."""
        for job, dataset in self.parts:
            self(Failed(job, "worker ended before finishing", dataset))
        self.sweep_bar.close()

    def _task_ids(self, job: int, dataset: str | None = None) -> list[int]:
        """The job's tasks (or the one of `dataset`) that have not ended yet."""
        ids = [task_id for (j, d), (task_id, _) in self.parts.items() if j == job and dataset in (None, d)]
        return [task_id for task_id in ids if self.store.status(task_id) in ("pending", "running")]

    def _bar(self, job: int, dataset: str) -> tqdm:
        """The bar of the task now receiving rows (one at a time: jobs run their parts in order)."""
        if self.task_bar is None or self.task_bar_key != (job, dataset):
            self._close_bar()
            self.task_bar_key = (job, dataset)
            self.task_bar = tqdm(
                total=self.todo[job, dataset],
                desc=f"{self.labels[job]} {dataset_label(dataset)}",
                unit="utt",
                position=1,
                leave=False,
                disable=not self.progress,
            )
        return self.task_bar

    def _close_bar(self) -> None:
        if self.task_bar is not None:
            self.task_bar.close()
            self.task_bar = None

    def _end(self, task_id: int, status: str, error: str | None = None) -> None:
        self.store.set_status(task_id, status, error)
        self._close_bar()
        self.sweep_bar.update(1)


# ---------------------------------------------------------------------------------------------- summary


def print_summary(
    results: list[dict[str, Any]], labels: Mapping[str, str] | None = None, console: Console | None = None
) -> None:
    """The one-screen terminal table: one row per (model, recipe), the WER of each dataset (under the
    experiment's `labels`), the RTF as the report gives it (median over the timed passes, min-max) and the size."""
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    models = list(dict.fromkeys(r["model"] for r in results))
    systems: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in results:
        systems.setdefault((result["model"], result["recipe"]), []).append(result)
    names = {parse_dataset_spec(spec).clean: label for spec, label in (labels or {}).items()}
    table = Table(title="whisper-ptq bench")
    headers = [f"WER {parse_dataset_spec(d).labelled(names.get(parse_dataset_spec(d).clean))}" for d in datasets]
    for column in [*(["model"] if len(models) > 1 else []), "recipe", *headers]:
        table.add_column(column)
    table.add_column("RTF", justify="right")
    table.add_column("size", justify="right")
    table.add_column("status", overflow="fold", max_width=50)
    for (model, recipe), cells in systems.items():
        wer = {c["dataset"]: c["summary"].get("wer") for c in cells}
        info = next((c["summary"] for c in cells if c["summary"]), {})
        clean = [c for c in cells if c["utterances"] and parse_dataset_spec(c["dataset"]).noise is None]
        passes = (task_passes([UtteranceResult(**u) for u in c["utterances"]], c["summary"]) for c in clean)
        speeds = pooled_speeds(passes)
        speed = speeds.get(info.get("batch_size"))
        size = f"{info['size_bytes'] / 1e6:.1f} MB" if "size_bytes" in info else "-"
        table.add_row(
            *([model] if len(models) > 1 else []),
            recipe,
            *(_number(wer.get(d), ".2f") for d in datasets),
            _rtf(speed),
            size + (f" ({0.0 - 100 * info['size_reduction']:+.0f}%)" if "size_reduction" in info else ""),
            _status(cells),
        )
    # Not narrower than 120 columns: a pipe or a small terminal would otherwise cut recipe names.
    (console or Console(width=max(120, Console().width))).print(table)


def _rtf(speed: Speed | None) -> str:
    if speed is None:
        return "-"
    return f"{speed.median:.3f}" + (f" ({speed.low:.3f}-{speed.high:.3f})" if speed.passes > 1 else "")


def _number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _status(cells: list[dict[str, Any]]) -> str:
    trouble = next((c for c in cells if c["status"] != "done"), None)
    if trouble is None:
        return "done"
    return f"{trouble['status']}: {trouble['error']}" if trouble["error"] else trouble["status"]
