"""The dataset-spec grammar, parsed in this one place: ``<kind>[:<arg>]`` followed by any number of
``+<modifier>:<key>=<value>,...``, e.g. ``librispeech:test-other+noise:snr=10,kind=babble,seed=0``.

Syntax only: which kinds and modifiers exist, and what their parameters mean, is `datasets`' and
`modifiers`' business. Light (no audio libraries): the report labels datasets from their specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from whisper_ptq.keyvalue import parse_key_values

NOISE = "noise"
CONCAT = "concat"


@dataclass(frozen=True)
class DatasetSpec:
    text: str  # as given
    kind: str
    arg: str
    modifiers: tuple[tuple[str, dict[str, str]], ...]  # (name, raw parameters), in order

    @property
    def base(self) -> str:
        """`<kind>[:<arg>]`."""
        return f"{self.kind}:{self.arg}" if self.arg else self.kind

    @property
    def noise(self) -> dict[str, str] | None:
        """The noise modifier's raw parameters (the report groups noisy variants of one dataset by them)."""
        return next((params for name, params in self.modifiers if name == NOISE), None)

    @property
    def clean(self) -> str:
        """The spec without its noise modifier."""
        kept = [f"{name}:{_params_text(params)}" for name, params in self.modifiers if name != NOISE]
        return "+".join([self.base, *kept])

    @property
    def concat(self) -> dict[str, str] | None:
        """The concat modifier's raw parameters: the spec's utterances are joined into long recordings."""
        return next((params for name, params in self.modifiers if name == CONCAT), None)

    @property
    def unjoined(self) -> str:
        """The spec without its concat modifier: the same audio, utterance by utterance."""
        kept = [f"{name}:{_params_text(params)}" for name, params in self.modifiers if name != CONCAT]
        return "+".join([self.base, *kept])

    @property
    def snr(self) -> float | None:
        noise = self.noise
        return None if noise is None else float(noise["snr"])

    @property
    def label(self) -> str:
        """A short name for tables and figures: `clean` and `other` for the two LibriSpeech test sets (the
        paper's names), a manifest's file name without its folder, and the noise level when there is one."""
        return self.labelled(None)

    def labelled(self, name: str | None) -> str:
        """`label`, with `name` (what an experiment calls this dataset without its noise) for the default name."""
        if name is None:
            short = {"test-clean": "clean", "test-other": "other"}
            if self.kind == "librispeech":
                name = short.get(self.arg, self.arg)
            elif self.kind == "manifest":
                name = PurePath(self.arg).stem
            else:
                name = self.base
            others = [f"{n}:{_params_text(p)}" for n, p in self.modifiers if n != NOISE]
            name = " ".join([name, *others])
        if self.noise is None:
            return name
        kind = self.noise.get("kind", "white")
        return f"{name} @ {self.snr:g} dB" + ("" if kind == "white" else f" {kind}")


def parse_dataset_spec(text: str) -> DatasetSpec:
    base, *modifiers = text.strip().split("+")
    kind, _, arg = base.partition(":")
    parsed = []
    for modifier in modifiers:
        name, _, body = modifier.partition(":")
        parsed.append((name, parse_key_values(body, f"dataset modifier {name!r} in {text!r}")))
    return DatasetSpec(text, kind, arg, tuple(parsed))


def dataset_label(spec: str) -> str:
    return parse_dataset_spec(spec).label


def _params_text(params: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())
