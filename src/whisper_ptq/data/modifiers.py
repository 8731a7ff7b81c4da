"""Dataset modifiers, written after ``+`` in a spec: deterministic transformations of the list of utterances
(`regroup`: `concat` joins consecutive ones into long recordings) and of each utterance's audio (`apply`:
`noise`). Every regrouping happens first, whatever its place in the spec; the audio ones then apply, in order,
to each (joined) utterance. Adding one means one class here and one entry in `MODIFIERS`."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from whisper_ptq.data.audio import load_audio
from whisper_ptq.errors import UserError

if TYPE_CHECKING:
    from whisper_ptq.data.datasets import Utterance

BABBLE_TALKERS = 4


class Modifier(Protocol):
    """A deterministic transformation of a dataset's utterances and of their audio, written after ``+``."""

    @property
    def spec(self) -> str: ...

    def regroup(self, utterances: Sequence[Utterance]) -> Sequence[Utterance]: ...

    def apply(self, audio: np.ndarray, utt: Utterance, pool: Sequence[Utterance]) -> np.ndarray: ...


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def _unit_power(x: np.ndarray) -> np.ndarray:
    power = _power(x)
    return x / math.sqrt(power) if power > 0 else x


def _utterance_rng(seed: int, utt_id: str) -> np.random.Generator:
    # Python's hash() is salted per process; SHA-256 gives the same stream on every run and machine.
    digest = hashlib.sha256(f"{seed}\0{utt_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True)
class NoiseModifier:
    """Additive noise at a fixed SNR relative to each utterance's own power."""

    snr_db: float
    kind: str = "white"
    seed: int = 0

    KINDS = ("white", "babble")
    USAGE = "noise:snr=<dB>,kind=white|babble,seed=<int>"

    @property
    def spec(self) -> str:
        return f"noise:snr={self.snr_db:g},kind={self.kind},seed={self.seed}"

    @classmethod
    def from_params(cls, params: dict[str, str], spec: str) -> NoiseModifier:
        unknown = sorted(set(params) - {"snr", "kind", "seed"})
        if unknown:
            raise UserError(f"unknown noise parameter {unknown[0]!r} in {spec!r}; expected {cls.USAGE}")
        if "snr" not in params:
            raise UserError(f"noise needs snr=<dB> in {spec!r}; expected {cls.USAGE}")
        try:
            snr_db = float(params["snr"])
            seed = int(params.get("seed", "0"))
        except ValueError as exc:
            raise UserError(f"bad noise parameter in {spec!r} ({exc}); expected {cls.USAGE}") from exc
        if not math.isfinite(snr_db):
            raise UserError(f"noise snr must be a finite number of dB in {spec!r}")
        kind = params.get("kind", "white")
        if kind not in cls.KINDS:
            raise UserError(f"unknown noise kind {kind!r} in {spec!r}; valid kinds: {', '.join(cls.KINDS)}")
        return cls(snr_db=snr_db, kind=kind, seed=seed)

    def regroup(self, utterances: Sequence[Utterance]) -> Sequence[Utterance]:
        return utterances

    def apply(self, audio: np.ndarray, utt: Utterance, pool: Sequence[Utterance]) -> np.ndarray:
        rng = _utterance_rng(self.seed, utt.id)
        if self.kind == "white":
            noise = rng.standard_normal(len(audio))
        else:
            noise = self._babble(len(audio), utt, pool, rng)
        signal_power, noise_power = _power(audio), _power(noise)
        if signal_power == 0 or noise_power == 0:
            return audio  # SNR is undefined for silence; leave the audio untouched.
        scale = math.sqrt(signal_power / (noise_power * 10 ** (self.snr_db / 10)))
        return (audio + scale * noise).astype(np.float32)

    @staticmethod
    def _babble(n: int, utt: Utterance, pool: Sequence[Utterance], rng: np.random.Generator) -> np.ndarray:
        others = [u for u in pool if u.id != utt.id]
        if not others:
            raise UserError(f"babble noise needs a dataset with at least 2 utterances (got only {utt.id})")
        picks = rng.choice(len(others), size=min(BABBLE_TALKERS, len(others)), replace=False)
        babble = np.zeros(n)
        for i in picks:
            talker = load_audio(others[i].audio_path).astype(np.float64)
            # Start each talker at a random point and loop it, so short talkers still cover the utterance.
            start = int(rng.integers(len(talker)))
            babble += _unit_power(np.resize(np.roll(talker, -start), n))
        return babble


@dataclass(frozen=True)
class ConcatModifier:
    """Long recordings for long-form studies: consecutive utterances of one chapter (their audio files' folder;
    `within=dataset`: of the whole dataset, in order) joined, `pause` seconds of silence between them, while the
    recording stays within `seconds` (an utterance longer than that stays alone). The reference is the
    members' texts joined by spaces. Deterministic: the same dataset gives the same recordings."""

    seconds: float
    within: str = "chapter"
    pause: float = 0.5

    WITHIN = ("chapter", "dataset")
    USAGE = "concat:seconds=<s>,within=chapter|dataset,pause=<s>"

    @property
    def spec(self) -> str:
        return f"concat:seconds={self.seconds:g},within={self.within},pause={self.pause:g}"

    @classmethod
    def from_params(cls, params: dict[str, str], spec: str) -> ConcatModifier:
        unknown = sorted(set(params) - {"seconds", "within", "pause"})
        if unknown:
            raise UserError(f"unknown concat parameter {unknown[0]!r} in {spec!r}; expected {cls.USAGE}")
        if "seconds" not in params:
            raise UserError(f"concat needs seconds=<s> in {spec!r}; expected {cls.USAGE}")
        try:
            seconds, pause = float(params["seconds"]), float(params.get("pause", "0.5"))
        except ValueError as exc:
            raise UserError(f"bad concat parameter in {spec!r} ({exc}); expected {cls.USAGE}") from exc
        if not (math.isfinite(seconds) and seconds > 0 and math.isfinite(pause) and pause >= 0):
            raise UserError(f"concat seconds must be positive and pause at least 0 in {spec!r}")
        within = params.get("within", "chapter")
        if within not in cls.WITHIN:
            raise UserError(f"unknown concat within={within!r} in {spec!r}; valid: {', '.join(cls.WITHIN)}")
        return cls(seconds, within, pause)

    def regroup(self, utterances: Sequence[Utterance]) -> Sequence[Utterance]:
        if any(u.text is None for u in utterances):
            raise UserError("concat needs transcripts: an audio-only dataset cannot be joined into scored recordings")
        groups: list[list[Utterance]] = []
        total = 0.0
        for utt in utterances:
            seconds = utt.duration()
            same = bool(groups) and (
                self.within == "dataset" or groups[-1][-1].audio_path.parent == utt.audio_path.parent
            )
            if same and total + self.pause + seconds <= self.seconds:
                groups[-1].append(utt)
                total += self.pause + seconds
            else:
                groups.append([utt])
                total = seconds
        return [group[0] if len(group) == 1 else _joined(group, self.pause) for group in groups]

    def apply(self, audio: np.ndarray, utt: Utterance, pool: Sequence[Utterance]) -> np.ndarray:
        return audio


def _joined(parts: list[Utterance], pause: float) -> Utterance:
    return replace(
        parts[0],
        id=f"{parts[0].id}..{parts[-1].id}",
        text=" ".join(p.text or "" for p in parts),
        parts=tuple(parts),
        pause=pause,
    )


@dataclass(frozen=True)
class _ModifierKind:
    usage: str
    parse: Callable[[dict[str, str], str], Modifier]  # (params, spec) -> modifier


MODIFIERS: dict[str, _ModifierKind] = {
    "noise": _ModifierKind(NoiseModifier.USAGE, NoiseModifier.from_params),
    "concat": _ModifierKind(ConcatModifier.USAGE, ConcatModifier.from_params),
}


def make_modifier(name: str, params: dict[str, str], spec: str) -> Modifier:
    if name not in MODIFIERS:
        usages = ", ".join(m.usage for m in MODIFIERS.values())
        raise UserError(f"unknown dataset modifier {name!r} in {spec!r}; valid modifiers: {usages}")
    return MODIFIERS[name].parse(params, spec)
