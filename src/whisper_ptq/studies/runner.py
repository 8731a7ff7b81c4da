"""The runner shared by the layer-wise studies (sensitivity, search): runs of one model, each a recipe, evaluated
into a results database, skipping what it already holds.

Each run reloads the small fp32 model (`Quantized.build`), the audio is decoded once for all runs (`preload`),
and a group run is refused when the backend quantized anything outside its group (a library that ignores
`Recipe.modules`).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from whisper_ptq.backends import library_packages
from whisper_ptq.backends.mixed import quantized_linears
from whisper_ptq.data import Dataset, Utterance
from whisper_ptq.errors import UserError, one_line
from whisper_ptq.models.names import ENCODER_PREFIX
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.environment import environment
from whisper_ptq.results.rows import UtteranceResult, summarize
from whisper_ptq.results.store import Store
from whisper_ptq.settings import Settings
from whisper_ptq.studies.groups import Group
from whisper_ptq.studies.identity import model_content, run_identity

if TYPE_CHECKING:
    from whisper_ptq.evaluation import Quantized

QUANTIZED_KEY = "group_quantized_modules"  # task info: how many of its group's modules a run quantized


@dataclass(frozen=True)
class PreloadedDataset(Dataset):
    """A dataset whose audio (decoded, resampled, noise mixed in) is computed once for all runs."""

    audio: dict[str, np.ndarray] | None = None

    def load_audio(self, utt: Utterance) -> np.ndarray:
        return self.audio[utt.id]


def preload(dataset: Dataset) -> PreloadedDataset:
    values = {f.name: getattr(dataset, f.name) for f in fields(Dataset)}
    return PreloadedDataset(**values, audio={u.id: dataset.load_audio(u) for u in dataset.utterances})


@dataclass(frozen=True)
class Run:
    """One model configuration to evaluate. `expected`: the Linear names it may quantize, checked after
    quantizing (None: not checked, e.g. the full recipe)."""

    label: str
    recipe: Recipe
    group: Group | None = None
    expected: frozenset[str] | None = None

    @property
    def keeps_encoder_fp32(self) -> bool:
        """Whether the encoder stays exactly the fp32 one (so its outputs can be shared between runs)."""
        if self.expected is None:
            return self.recipe.is_baseline
        return not any(name.startswith(ENCODER_PREFIX) for name in self.expected)


class EncoderOutputs:
    """fp32 encoder outputs by input features, shared by every run that leaves the encoder fp32: the fp32 run
    and each decoder-side group. Whisper's encoder sees 30 s of padded audio whatever the utterance, so it is
    most of the work on CPU; reusing its output is exact, since the same fp32 weights see the same features.
    (Those runs' RTF then excludes the encoder, and their task info says so.)"""

    def __init__(self) -> None:
        self.outputs: dict[bytes, Any] = {}

    def share_(self, model: Any) -> None:
        encoder = model.get_encoder()
        compute = encoder.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            features = kwargs["input_features"] if "input_features" in kwargs else args[0]
            key = hashlib.blake2b(features.detach().cpu().numpy().tobytes(), digest_size=16).digest()
            if key not in self.outputs:
                self.outputs[key] = compute(*args, **kwargs)
            cached = self.outputs[key]
            return type(cached)(**cached)  # a fresh container: generate may rebind its fields

        encoder.forward = forward  # on this instance only


@dataclass(frozen=True)
class Measurement:
    run: Run
    dataset: str
    n_utterances: int
    wer: float
    cer: float
    size_bytes: int
    fp32_size_bytes: int
    quantized_modules: int | None  # of the run's expected modules, how many the library quantized
    rows: tuple[UtteranceResult, ...] = field(default=(), compare=False, repr=False)  # for paired tests

    @property
    def size_fraction(self) -> float:
        return self.size_bytes / self.fp32_size_bytes


class Runner:
    """Evaluates runs of one model on datasets into a results database, skipping what it already holds."""

    def __init__(self, store: Store, model: str, settings: Settings, linears: Sequence[str]):
        """`linears`: every Linear name of the fp32 model (`mixed.all_linears`), to check group runs."""
        self.store, self.model, self.settings, self.linears = store, model, settings, list(linears)
        self.environment_id = store.record_environment({**environment(library_packages()), "argv": sys.argv})
        self.position = 0
        self.encoder_outputs = EncoderOutputs()
        self.model_content = model_content(model, settings.cache_dir)
        # (dataset spec, utterances) -> what `Store.drop_stale` expects; a limited dataset is a prefix of its spec's
        self.expected: dict[tuple[str, int], dict[str, tuple[str, str | None]]] = {}

    def _expected(self, dataset: Dataset) -> dict[str, tuple[str, str | None]]:
        key = (dataset.spec, len(dataset.utterances))
        if key not in self.expected:
            self.expected[key] = {u.id: (dataset.fingerprint(u), u.text) for u in dataset.utterances}
        return self.expected[key]

    def measure(self, run: Run, dataset: Dataset, replace_changed: bool = False) -> Measurement:
        """The run's figures over exactly `dataset`'s utterances (the task may hold more, from a run with a
        larger limit into the same database). `replace_changed`: see `Store.ensure_task`. Stored rows of audio
        or text that changed since are computed again."""
        identity = run_identity(self.model_content, run.recipe, dataset, self.settings)
        task_id = self.store.ensure_task(
            self.position, self.model, run.recipe, dataset.spec, identity, replace_changed=replace_changed
        )
        self.position += 1
        ids = {u.id for u in dataset.utterances}
        self.store.drop_stale(task_id, self._expected(dataset), keep_unlisted=True)
        stored = self.store.done_ids(task_id)
        if ids - stored:
            self._evaluate(run, dataset, task_id, stored)
        rows = [row for row in self.store.rows(task_id) if row.id in ids]
        info = self._info(run.recipe, dataset.spec)
        figures = summarize(rows)
        return Measurement(
            run,
            dataset.spec,
            len(rows),
            figures["wer"],
            figures["cer"],
            info["size_bytes"],
            info["fp32_size_bytes"],
            info.get(QUANTIZED_KEY),
            tuple(rows),
        )

    def _evaluate(self, run: Run, dataset: Dataset, task_id: int, stored: set[str]) -> None:
        self.store.set_status(task_id, "running", environment_id=self.environment_id)
        try:
            from whisper_ptq.evaluation import Quantized  # the model stack, when a run really runs

            quantized = Quantized.build(self.model, run.recipe, self.settings, evaluated=[dataset])
            info = {**quantized.info, **self._check_quantized(run, quantized)}
            if run.keeps_encoder_fp32:
                self.encoder_outputs.share_(quantized.built.model)
                info["encoder_outputs"] = "shared with the other runs whose encoder is fp32: RTF excludes the encoder"
            self.store.merge_info(task_id, info)
            quantized.evaluate(
                dataset,
                done=stored,
                on_rows=lambda rows: self.store.add_rows(task_id, rows, self.environment_id),
                progress=self.settings.progress,
            )
        except BaseException as exc:
            self.store.set_status(task_id, "failed", one_line(exc))
            raise
        self.store.set_status(task_id, "done")

    def _check_quantized(self, run: Run, model: Quantized) -> dict[str, int]:
        """Refuse a run that quantized outside its modules; count those it did quantize (a library may skip
        some it was given, e.g. a head it never quantizes: that group then reads as fp32 and says so)."""
        if run.expected is None:
            return {}
        quantized = quantized_linears(model.built.model, self.linears)
        stray = quantized - run.expected
        if stray:
            raise UserError(
                f"recipe {run.recipe.name!r} also quantized {min(stray)}: library {run.recipe.library} ignores "
                "Recipe.modules, so it cannot be restricted to one group"
            )
        return {QUANTIZED_KEY: len(quantized)}

    def _info(self, recipe: Recipe, dataset: str) -> dict[str, Any]:
        return next(
            r["summary"]
            for r in self.store.results()
            if (r["model"], r["recipe"], r["dataset"]) == (self.model, recipe.name, dataset)
        )
