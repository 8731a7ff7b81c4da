"""Experiments: what a bench evaluates and how, from a TOML file or a preset, validated key by key (each
error names the file and line). Light: the driver reads experiments without the model stack."""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from whisper_ptq.data.modifiers import NoiseModifier
from whisper_ptq.data.specs import parse_dataset_spec
from whisper_ptq.errors import UserError
from whisper_ptq.report.analysis import DEFAULT_TOLERANCE
from whisper_ptq.results.store import RESULTS_FILE, Store
from whisper_ptq.settings import DEFAULT_CALIBRATION, TASKS, DecodingOptions, Settings

DEFAULT_EXPERIMENT = "paper"
PAPER_PRESETS = ("paper", "paper-gpu")  # stored before `paper_comparison` existed, they had the paper's claims
# Keys that change no stored row: how the report reads the results, and how often speed is timed. They are not
# part of an experiment's identity, so changing them resumes the same results database (see `Store.for_experiment`).
UNMEASURED = ("repeats", "timing_batch_sizes", "labels", "tolerance", "reference_dataset", "paper_comparison")


@dataclass(frozen=True)
class Experiment:
    """What a sweep evaluates and how; `config()` is stored in the results database, and all of it but the
    `UNMEASURED` keys is its identity there."""

    name: str
    recipes: tuple[str, ...]
    datasets: tuple[str, ...]
    models: tuple[str, ...] = ("base",)
    snrs: tuple[float, ...] = ()  # each dataset is also evaluated with noise at each of these SNRs (dB)
    noise: str = "white"
    noise_seed: int = 0
    limit: int | None = None
    batch_size: int = 1
    threads: int | None = None
    device: str = "cpu"
    calibration: str = DEFAULT_CALIBRATION
    calibration_limit: int = 32
    # Decoding (`settings.DecodingOptions`), the same for every task of the experiment.
    language: str = "en"
    task: str = "transcribe"
    beam_size: int = 1
    temperature_fallback: bool = False
    condition_on_previous_text: bool = False
    repeats: int = 1  # timed passes per batch size; the accuracy pass is the first at `batch_size`
    timing_batch_sizes: tuple[int, ...] = ()  # further batch sizes timed (not scored again), e.g. 1 for latency
    labels: tuple[tuple[str, str], ...] = ()  # (dataset as listed, its short name in the report)
    tolerance: float = DEFAULT_TOLERANCE  # WER points above fp32 on the reference dataset a recipe may lose
    reference_dataset: str | None = None  # a listed dataset (or its label); None: test-other, else the first
    paper_comparison: bool = False  # set by the paper presets: the report sets the seed paper's claims beside ours
    source: str = field(default="", compare=False)  # the file or preset it came from, for error messages

    def config(self) -> dict[str, Any]:
        config = asdict(self)
        del config["source"]  # where it was read from does not change what it is
        # Decoding options at their defaults are left out: databases written before they existed keep their identity.
        for key in DecodingOptions().to_dict():
            del config[key]
        config.update(self.decoding.changed())
        config["labels"] = dict(self.labels)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}

    @property
    def decoding(self) -> DecodingOptions:
        return DecodingOptions(
            self.language, self.task, self.beam_size, self.temperature_fallback, self.condition_on_previous_text
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "") -> Experiment:
        """An experiment from its stored config; one stored before a key existed takes that key's default, but
        the paper presets' databases keep the paper's claims in their report."""
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()}
        values["labels"] = tuple(dict(config.get("labels") or {}).items())
        values.setdefault("paper_comparison", config.get("name") in PAPER_PRESETS)
        return cls(**values, source=source)

    def dataset_specs(self) -> list[str]:
        """Every dataset as listed, each followed by its noisy variants."""
        return [
            variant
            for spec in self.datasets
            for variant in (
                spec,
                *(f"{spec}+noise:snr={snr:g},kind={self.noise},seed={self.noise_seed}" for snr in self.snrs),
            )
        ]

    def settings(self, data_root: Path | None, cache_dir: Path | None) -> Settings:
        return Settings(
            device=self.device,
            batch_size=self.batch_size,
            threads=self.threads,
            data_root=data_root,
            cache_dir=cache_dir,
            calibration=self.calibration,
            calibration_limit=self.calibration_limit,
            progress=False,  # workers draw no bars: the driver draws them from the events
            decoding=self.decoding,
        )


@dataclass(frozen=True)
class _Key:
    """What an experiment file's key must hold."""

    expected: str
    valid: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML `true` is not a count


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v.strip() for v in value)


def _dataset_entries(value: Any) -> bool:
    """Each entry a spec, or a table {spec = "...", label = "..."} naming it in the report."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            (isinstance(v, str) and v.strip())
            or (
                isinstance(v, dict)
                and "spec" in v
                and set(v) <= {"spec", "label"}
                and all(isinstance(x, str) and x.strip() for x in v.values())
            )
            for v in value
        )
    )


_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
_STRING = _Key("a string", lambda v: isinstance(v, str) and bool(v.strip()))
_STRINGS = _Key("a non-empty list of strings", _strings)
_COUNT = _Key("a positive integer", lambda v: _is_int(v) and v >= 1)
KEYS: dict[str, _Key] = {
    # The name becomes the default output dir runs/<name>, so it must be one plain path component.
    "name": _Key("letters, digits, '.', '_' or '-'", lambda v: isinstance(v, str) and _NAME.fullmatch(v) is not None),
    "models": _STRINGS,
    "recipes": _STRINGS,
    "datasets": _Key('a non-empty list of dataset specs or {spec = "...", label = "..."} tables', _dataset_entries),
    "snrs": _Key("a list of numbers (dB)", lambda v: isinstance(v, list) and all(_is_number(x) for x in v)),
    "noise": _Key(" or ".join(f'"{k}"' for k in NoiseModifier.KINDS), lambda v: v in NoiseModifier.KINDS),
    "noise_seed": _Key("an integer", _is_int),
    "limit": _COUNT,
    "batch_size": _COUNT,
    "threads": _COUNT,
    "device": _Key('"cpu", "cuda" or "cuda:<N>"', lambda v: isinstance(v, str) and _DEVICE.fullmatch(v) is not None),
    "calibration": _STRING,
    "calibration_limit": _COUNT,
    "language": _Key('a Whisper language code or "auto"', lambda v: isinstance(v, str) and bool(v.strip())),
    "task": _Key(" or ".join(f'"{t}"' for t in TASKS), lambda v: v in TASKS),
    "beam_size": _COUNT,
    "temperature_fallback": _Key("true or false", lambda v: isinstance(v, bool)),
    "condition_on_previous_text": _Key("true or false", lambda v: isinstance(v, bool)),
    "repeats": _COUNT,
    "timing_batch_sizes": _Key(
        "a list of positive integers", lambda v: isinstance(v, list) and all(_is_int(x) and x >= 1 for x in v)
    ),
    "tolerance": _Key("a number of WER points, at least 0", lambda v: _is_number(v) and v >= 0),
    "reference_dataset": _STRING,
    "paper_comparison": _Key("true or false", lambda v: isinstance(v, bool)),
}
REQUIRED = ("recipes", "datasets")


def presets() -> dict[str, Path]:
    folder = resources.files("whisper_ptq") / "presets"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def load_experiment(name_or_path: str) -> Experiment:
    """A preset by name, or an experiment file by path."""
    known = presets()
    if name_or_path in known:
        return parse_experiment(known[name_or_path].read_text(), f"preset {name_or_path!r}", name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix != ".toml" and not path.exists():
        raise UserError(
            f"unknown experiment {name_or_path!r}: presets are {', '.join(sorted(known))}, or give a .toml file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read experiment file {path}: {exc.strerror}") from None
    return parse_experiment(text, str(path), path.stem)


def parse_experiment(text: str, source: str, default_name: str) -> Experiment:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: invalid TOML: {exc}") from None  # the message names line and column
    for key, value in data.items():
        where = _where(source, text, key)
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(KEYS)}"
            raise UserError(f"{where}: unknown key {key!r}{hint}")
        if not KEYS[key].valid(value):
            raise UserError(f"{where}: {key!r} must be {KEYS[key].expected}, got {value!r}")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise UserError(f"{source}: missing key {missing[0]!r} ({KEYS[missing[0]].expected})")
    entries = [e if isinstance(e, dict) else {"spec": e} for e in data.pop("datasets")]
    data["datasets"] = [e["spec"] for e in entries]
    data["labels"] = {e["spec"]: e["label"].strip() for e in entries if "label" in e}
    _check_labels(data, source, text)
    experiment = Experiment.from_config({"name": default_name, **data}, source)
    try:
        experiment.decoding  # noqa: B018 - validates the language
    except UserError as exc:
        raise UserError(f"{_where(source, text, 'language')}: {exc}") from None
    return experiment


def _check_labels(data: dict[str, Any], source: str, text: str) -> None:
    """Labels name columns and figure series: two datasets may not share one, and `reference_dataset` must name
    a listed dataset by its spec or its label."""
    labels = {spec: data["labels"].get(spec) or parse_dataset_spec(spec).label for spec in data["datasets"]}
    seen: dict[str, str] = {}
    for spec, label in labels.items():
        if label in seen:
            raise UserError(
                f"{_where(source, text, 'datasets')}: datasets {seen[label]!r} and {spec!r} are both labelled "
                f'{label!r}; give one a label of its own: {{spec = "...", label = "..."}}'
            )
        seen[label] = spec
    reference = data.get("reference_dataset")
    if reference is not None and reference not in labels and reference not in seen:
        raise UserError(
            f"{_where(source, text, 'reference_dataset')}: reference_dataset {reference!r} is not a listed dataset; "
            f"give one of: {', '.join(repr(x) for pair in labels.items() for x in pair)}"
        )


def _where(source: str, text: str, key: str) -> str:
    """`source:line` of the key's first assignment; tomllib reports positions only for syntax errors."""
    match = re.search(rf"^\s*{re.escape(key)}\s*=", text, re.MULTILINE)
    return f"{source}:{text.count(chr(10), 0, match.start()) + 1}" if match else source


def select_experiment(
    name_or_path: str | None, out: Path | None, resume: bool, limit: int | None
) -> tuple[Experiment, Path]:
    """The experiment and output dir of a bench command. With `resume` and no experiment named, the one
    stored in the output dir is continued; with `resume`, a dir holding no results is an error."""
    if resume and name_or_path is None:
        out = out or Path("runs") / DEFAULT_EXPERIMENT
        experiment = stored_experiment(out)
    else:
        experiment = load_experiment(name_or_path or DEFAULT_EXPERIMENT)
        out = out or Path("runs") / experiment.name
        if resume and not (out / RESULTS_FILE).exists():
            raise UserError(f"nothing to resume: {out} holds no {RESULTS_FILE}")
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} exists and is a file")
    return (replace(experiment, limit=limit) if limit is not None else experiment), out


def stored_experiment(out: Path) -> Experiment:
    with Store.open(out / RESULTS_FILE, writable=False) as store:
        return Experiment.from_config(store.experiment.config, str(out / RESULTS_FILE))


def stored_results(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The experiment config (every key, defaults for those it was stored without) and the results an output
    dir holds: the report's input."""
    with Store.open(out / RESULTS_FILE, writable=False) as store:
        return Experiment.from_config(store.experiment.config).config(), store.results()
