"""The small interface every quantization library implements, and what it shares.

A backend turns raw parameters into a validated `Recipe` (`recipe`), checks a Recipe made elsewhere (a recipe
file) against them (`validate`), says whether a recipe can run here
(`check`), quantizes a loaded model into a `Transcriber` (`quantize`), and serializes the result through
the library's own save path (`save`), which is also how size is measured and what an export ships. `load`
restores what `save` wrote; `loaders` say how a user loads it without whisper-ptq (the export's model card).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from whisper_ptq.errors import UserError
from whisper_ptq.models.names import HEAD, english_prompt
from whisper_ptq.recipes import OptionValue, Recipe

if TYPE_CHECKING:
    import numpy as np
    import torch

    from whisper_ptq.engines import Transcriber


@dataclass(frozen=True)
class Param:
    """One parametric-recipe parameter: its type, default, and (optionally) the allowed values."""

    kind: type
    default: OptionValue
    choices: tuple[OptionValue, ...] | None = None
    help: str = ""

    def parse(self, library: str, key: str, raw: str) -> OptionValue:
        try:
            if self.kind is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value: OptionValue = raw.lower() in ("true", "1", "yes")
            elif self.kind is str and raw.lower() == "none" and None in (self.choices or ()):
                value = None
            else:
                value = self.kind(raw)
        except ValueError:
            raise UserError(
                f"recipe parameter {library}:{key}={raw!r} is not a {self.kind.__name__}{self._choices_hint()}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise UserError(f"recipe parameter {library}:{key}={raw!r} is not valid{self._choices_hint()}")
        return value

    def _choices_hint(self) -> str:
        return f"; valid: {', '.join(str(c) for c in self.choices)}" if self.choices else ""


@dataclass
class BuildContext:
    """What a backend may need besides the model: device, calibration audio (loaded lazily), scratch space."""

    device: str = "cpu"
    calibration: Callable[[], list[np.ndarray]] | None = None
    calibration_spec: str | None = None
    calibration_key: str | None = None  # what the calibration audio is (its spec and every clip's fingerprint)
    work_dir: Path | None = None


@dataclass
class Built:
    """A ready-to-run quantized model and the facts about how it was made (recorded in summary.json)."""

    transcriber: Transcriber
    model: Any = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Loader:
    """One way to load an export in a program of one's own: a complete script, run as
    `python transcribe.py EXPORT_DIR CLIP...`, that prints one transcript per clip. `exact`: it decodes as
    whisper-ptq measured (same features, greedy search, same prompt), so it prints the measured transcripts."""

    title: str
    packages: tuple[str, ...]
    script: str
    exact: bool = True
    note: str = ""


WHISPER_PTQ_SCRIPT = """\
import sys

import whisper_ptq

model = whisper_ptq.load(sys.argv[1])  # the recipe's own engine, restored as whisper-ptq measured it
for clip in sys.argv[2:]:
    print(model.transcribe(clip))
"""


# How every load script that computes its own features reads a clip, as whisper-ptq's `data.audio.load_audio`
# does: any rate and channel count to 16 kHz mono (transformers' feature extractor refuses any other rate), and a
# clip longer than the 30 s window is refused, not silently cut (the features hold 30 s).
CLIP_PACKAGES = ("soundfile", "soxr")
CLIP_IMPORTS = ("import sys", "import soundfile", "import soxr")
READ_CLIP = """\
    audio, rate = soundfile.read(clip, dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), rate, 16000, quality="HQ")  # 16 kHz mono, as Whisper hears
    if len(audio) > 30 * 16000:
        sys.exit(f"{clip}: {len(audio) / 16000:.1f} s; this script transcribes clips of 30 s or less")"""


# The decoding loop of an exported encoder/decoder graph pair (`engines/graphs.py`) written out for a user's own
# program: short-form greedy search under the export's generation_config.json, as `engines.decoding` decodes a
# clip of 30 s or less. `{sessions}` defines `encode` and `decode` (feeds -> outputs) with the runtime's own API.
GRAPH_SCRIPT = """\
{header}

export = sys.argv[1]
processor = WhisperProcessor.from_pretrained(export)
generation = GenerationConfig.from_pretrained(export)
{sessions}
prompt = processor.tokenizer.convert_tokens_to_ids({prompt})
for clip in sys.argv[2:]:
{read_clip}
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    cross = encode({{"input_features": features.astype(np.float32)}})  # cross_key_i, cross_value_i per layer
    past = [np.zeros((1, c.shape[1], 0, c.shape[3]), np.float32) for c in cross]
    tokens, new = list(prompt), list(prompt)
    while len(tokens) < generation.max_length:
        feeds = {{"input_ids": np.array([new], dtype=np.int64)}}
        for i in range(len(cross) // 2):
            feeds |= {{f"past_key_{{i}}": past[2 * i], f"past_value_{{i}}": past[2 * i + 1]}}
            feeds |= {{f"cross_key_{{i}}": cross[2 * i], f"cross_value_{{i}}": cross[2 * i + 1]}}
        logits, *past = decode(feeds)  # the last new token's logits, then present_key_i, present_value_i
        logits = np.array(logits[0], dtype=np.float32)
        logits[generation.suppress_tokens] = -np.inf
        if len(tokens) == len(prompt):
            logits[generation.begin_suppress_tokens] = -np.inf
        token = int(logits.argmax())
        tokens.append(token)
        if token == generation.eos_token_id:
            break
        new = [token]
    print(processor.tokenizer.decode(tokens, skip_special_tokens=True))
"""


def graph_loader(
    title: str, packages: Iterable[str], imports: Iterable[str], sessions: str, english_only: bool
) -> Loader:
    """The load script of an export of the two graphs, run by the runtime `sessions` sets up."""
    header = import_block(
        [*CLIP_IMPORTS, "import numpy as np", "from transformers import GenerationConfig, WhisperProcessor", *imports]
    )
    prompt = list(english_prompt(english_only))
    script = GRAPH_SCRIPT.format(header=header, sessions=sessions.strip(), prompt=prompt, read_clip=READ_CLIP)
    note = "Clips of 30 s or less (whisper-ptq's long-form decoding seeks through longer recordings)."
    return Loader(title, (*packages, "transformers", *CLIP_PACKAGES), script, note=note)


def transformers_loader(
    title: str, packages: Iterable[str], imports: Iterable[str], load: str, english_only: bool, note: str = ""
) -> Loader:
    """A script around lines that define `model` (a transformers Whisper model) from `model_dir`: the
    processor saved beside it, then `generate` with the decoding `engines.hf.HFTranscriber` uses (greedy,
    English, transcribe, no timestamps: the export's generation_config.json plus the language for
    multilingual models). `imports`: the import lines `load` needs."""
    language = "" if english_only else ', language="en", task="transcribe"'
    header = import_block([*CLIP_IMPORTS, "import torch", "from transformers import WhisperProcessor", *imports])
    script = f"""\
{header}

model_dir = sys.argv[1]
{load}
processor = WhisperProcessor.from_pretrained(model_dir)
for clip in sys.argv[2:]:
{READ_CLIP}
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features.to(model.dtype)
    with torch.no_grad():
        ids = model.generate(features{language})
    print(processor.batch_decode(ids, skip_special_tokens=True)[0])
"""
    return Loader(title, ("transformers", "torch", *CLIP_PACKAGES, *packages), script, note=note)


def import_block(lines: Iterable[str]) -> str:
    """Import lines as isort writes them: the standard library first, `from M import a, b` merged per module."""
    plain: dict[str, str] = {}  # module -> its line (`import numpy as np`)
    names: dict[str, set[str]] = {}
    for line in lines:
        words = line.split()
        if words[0] == "import":
            plain[words[1]] = line
        else:
            names.setdefault(words[1], set()).update(name.strip() for name in line.split(" import ")[1].split(","))
    modules = sorted({*plain, *names}, key=lambda m: (m.split(".")[0] not in sys.stdlib_module_names, m))
    groups: list[list[str]] = [[], []]
    for module in modules:
        group = groups[module.split(".")[0] not in sys.stdlib_module_names]
        if module in plain:
            group.append(plain[module])
        if module in names:
            group.append(f"from {module} import {', '.join(sorted(names[module]))}")
    return "\n\n".join("\n".join(group) for group in groups if group)


@contextlib.contextmanager
def _attributes(target: Any, values: dict[str, Any]) -> Iterator[None]:
    """Set attributes for the duration of the block, then restore them (or remove those that were absent)."""
    missing = object()
    old = {name: getattr(target, name, missing) for name in values}
    for name, value in values.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is missing:
                delattr(target, name)
            else:
                setattr(target, name, value)


def save_transformers(model: Any, out_dir: Path, quantization_config: Any = None, quantizer: Any = None) -> None:
    """`save_pretrained` of a model quantized outside transformers, so that `from_pretrained(out_dir)` loads
    it: config.json names the `quantization_config` transformers must rebuild the layers with, a head no
    longer tied to the embedding is saved untied, and `quantizer` (a transformers HfQuantizer) flattens
    tensor subclasses for safetensors as it does when transformers quantized the model itself. The live
    model is left as it was."""
    config = model.config
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    overrides: dict[str, Any] = {"quantization_config": quantization_config} if quantization_config else {}
    if getattr(head, "weight", None) is not getattr(embedding, "weight", None):
        overrides["tie_word_embeddings"] = False
    with _attributes(config, overrides), _attributes(model, {"hf_quantizer": quantizer} if quantizer else {}):
        # save_original_format=False: the weights are saved as they are; transformers would otherwise try to
        # reverse the conversions a pre-quantized load attached (and cannot: TorchAoDeserialize has no reverse)
        model.save_pretrained(out_dir, save_original_format=False)


class Backend(ABC):
    library: ClassVar[str]
    description: ClassVar[str]
    # Python modules the backend imports, mapped to the pip package that provides them.
    requires: ClassVar[dict[str, str]] = {}
    params: ClassVar[dict[str, Param]] = {}
    # name -> (description, raw parameters as typed on the command line)
    named: ClassVar[dict[str, tuple[str, dict[str, str]]]] = {}
    # What its engine's decoding can do, refused before any model loads when asked: beam search, audio longer
    # than Whisper's 30 s window (`engines.decoding` gives every window decoder long form).
    beam_search: ClassVar[bool] = True
    long_form: ClassVar[bool] = True
    # Whether `quantize`'s saved output is kept in the cache and restored by `load` when the same build is asked
    # for again (`backends/reuse.py`): for backends whose conversion takes most of the time to open a recipe.
    reuse_builds: ClassVar[bool] = False
    # Recipe options that act only when a saved build is loaded (how the runtime runs it), not on what is saved:
    # recipes that differ only in these share one kept build.
    load_options: ClassVar[tuple[str, ...]] = ()

    def recipe(self, raw: dict[str, str], name: str, description: str = "") -> Recipe:
        unknown = sorted(set(raw) - set(self.params))
        if unknown:
            raise UserError(
                f"recipe {name!r}: unknown parameter {unknown[0]!r} for {self.library}; "
                f"valid: {', '.join(self.params) or '(none)'}"
            )
        values = {key: param.default for key, param in self.params.items()}
        values.update({key: self.params[key].parse(self.library, key, text) for key, text in raw.items()})
        return self.make_recipe(name, values, description)

    def validate(self, recipe: Recipe, where: str) -> None:
        """Refuse a Recipe read from a file unless this backend's parameters make it: its fields must equal those
        `make_recipe` gives for some parameter values (each parameter's choices, or the value the recipe holds
        for it), so a file can ask for nothing the parametric form refuses. `modules` may restrict it (a
        sensitivity run); name and description are free. The error names the first field no choice gives."""
        for pattern in recipe.modules:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(f"{where}: modules entry {pattern!r} is not a regular expression ({exc})") from None
        wanted = decided_fields(recipe)
        candidates = []
        for values in self._values_to_try(recipe):
            try:
                made = decided_fields(self.make_recipe(recipe.name, values, recipe.description))
            except UserError:
                continue
            if made == wanted:
                return
            candidates.append(made)
        if not candidates:  # make_recipe refuses everything (the mixed backend, which validates its plan itself)
            raise UserError(f"{where}: {self.library} recipes cannot be given as a file")
        nearest = min(candidates, key=lambda made: sum(made[k] != wanted[k] for k in wanted))
        key = next(k for k in wanted if nearest[k] != wanted[k])
        # The values of that field this backend makes when everything else is as the file says (if any do).
        alike = [made for made in candidates if all(made[k] == wanted[k] for k in wanted if k != key)]
        values = {json.dumps(made[key]): made[key] for made in alike or candidates}
        try:
            valid = [json.dumps(v) for v in sorted(values.values())]
        except TypeError:  # values of several types (None among strings)
            valid = sorted(values)
        given = json.dumps(wanted[key])
        raise UserError(f"{where}: {key} {given} is not valid for {self.library}; valid: {', '.join(valid)}")

    def _values_to_try(self, recipe: Recipe) -> Iterable[dict[str, OptionValue]]:
        """Every combination of parameter values: a parameter's default and choices, else both booleans, else its
        default and the value the recipe holds under its name (an option or a field)."""
        fields = recipe.to_dict()
        axes = []
        for key, param in self.params.items():
            if param.choices is not None:
                axes.append(tuple(dict.fromkeys([param.default, *param.choices])))
            elif param.kind is bool:
                axes.append((False, True))
            else:
                held = dict(recipe.options).get(key, fields.get(key, param.default))
                axes.append(tuple(dict.fromkeys([param.default, held])))
        for combination in itertools.product(*axes):
            yield dict(zip(self.params, combination, strict=True))

    def named_recipes(self) -> dict[str, Recipe]:
        return {name: self.recipe(raw, name, text) for name, (text, raw) in self.named.items()}

    @abstractmethod
    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        """Map validated parameter values to a Recipe; raise UserError for impossible combinations."""

    def slow_here(self, recipe: Recipe, device: str) -> str | None:
        """Why this recipe runs slower than it should on this machine's CPU (None when nothing is known to):
        shown by `list` and printed before a run, so a "fast" recipe is never silently slower than fp32."""
        return None

    def check(self, recipe: Recipe, device: str) -> str | None:
        """Why this recipe cannot run on `device` here (None when it can)."""
        missing = [pkg for module, pkg in self.requires.items() if importlib.util.find_spec(module) is None]
        if missing:
            return f"library not installed: pip install {' '.join(missing)}"
        kind = device.split(":")[0]
        if kind not in recipe.devices:
            return f"{recipe.name} runs on {'/'.join(recipe.devices)}, not {kind}"
        if kind == "cuda" and not _cuda_available():
            return "no CUDA device present"
        return None

    @abstractmethod
    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        """Quantize `bundle.model` (a WhisperBundle) in place where possible and return a runnable model."""

    def save(self, quantized: Built, out_dir: Path) -> None:
        """Serialize through the library's own save path, in the form its users load (an export ships what
        this writes). The default: torch.save of the state dict, which is how torch.ao, HQQ and torchao's int4
        tensors (packed, with scales) serialize themselves."""
        import torch

        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(quantized.model.state_dict(), out_dir / "model.pt")

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        """Rebuild a quantized model from what `save` wrote, on top of the unquantized `bundle` (export)."""
        raise UserError(f"{self.library} models cannot be exported and reloaded by whisper-ptq")

    def loaders(self, recipe: Recipe, english_only: bool) -> list[Loader]:
        """How a user loads what `save` wrote (with the export's config and processor files), the library's
        own way first. The default: whisper-ptq's loader, for engines no other library can run."""
        return [
            Loader(
                "whisper-ptq",
                ("whisper-ptq",),
                WHISPER_PTQ_SCRIPT,
                note=f"No other library loads {self.library} models of this recipe: whisper-ptq rebuilds them.",
            )
        ]


def decided_fields(recipe: Recipe) -> dict[str, Any]:
    """The fields a backend decides (what `validate` compares), as JSON-like values."""
    fields = recipe.to_dict()
    for free in ("name", "description", "modules"):
        del fields[free]
    return fields


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def keep_head_param(kept_by_default: bool) -> Param:
    """The `keep` parameter: whether the LM head stays in full precision, tied to the token embedding and
    stored once, or is quantized like every nn.Linear, which unties it (embedding and head both stored)."""
    default = HEAD if kept_by_default else None
    return Param(
        str,
        default,
        (None, HEAD),
        f"{HEAD} keeps the LM head in full precision; none quantizes it (default {default})",
    )


def head_info(recipe: Recipe) -> str:
    """What happened to the LM head, for summary.json (it is a third of tiny's and base's weights)."""
    if recipe.selects(HEAD):
        return "quantized; tie to embed_tokens broken, the full-precision embedding is saved separately"
    return "not quantized, still tied to model.decoder.embed_tokens (stored once)"


def replace_linears_(model: torch.nn.Module, names: Iterable[str], make: Callable[[Any], torch.nn.Module]) -> None:
    """Swap each named module for `make(module)`, one at a time, so at most one layer is ever held twice.
    The new module takes the old one's train/eval mode: a fresh module is in training mode, and in training
    mode bitsandbytes takes its fine-tuning paths on CPU (dequantize + fp matmul) instead of its kernels."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, make(old).train(old.training))


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def linear_layers(model: torch.nn.Module) -> dict[str, int]:
    """Name -> weight count of every nn.Linear, except one whose weight is tied to the token embedding
    (Whisper's `proj_out`): it is the embedding, and most recipes keep it in full precision."""
    import torch

    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    return {
        name: module.in_features * module.out_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding
    }


def head_kept(recipe: Recipe) -> bool:
    """Whether the recipe leaves the LM head in full precision."""
    return not recipe.selects(HEAD)


def targets(model: torch.nn.Module, recipe: Recipe) -> set[str]:
    """The nn.Linear names to quantize: those the recipe selects, the LM head included unless kept."""
    return set(target_linears(model, recipe, lm_head=True))


def target_linears(model: torch.nn.Module, recipe: Recipe, lm_head: bool = False) -> list[str]:
    """Names of the nn.Linear modules a recipe quantizes: those it selects (`Recipe.selects`), and the tied
    LM head `proj_out` only when the backend asks for it."""
    import torch

    names = list(linear_layers(model))
    if lm_head and isinstance(getattr(model, HEAD, None), torch.nn.Linear):
        names.append(HEAD)
    return [name for name in names if recipe.selects(name)]


def unquantized_parts(model: torch.nn.Module, linears: Iterable[str]) -> list[str]:
    """What a quantized model still holds as plain floating-point weights, by part, with the dtype: e.g.
    `token embedding + LM head (tied) float32`, `2 of 64 linear layers float32: model.encoder.layers.0.fc1, ...`.
    `linears` are the unquantized model's nn.Linear names (`linear_layers`), so a layer a backend replaced
    counts as quantized. A module counts as plain when it is exactly torch's own class holding a plain tensor:
    quantized layers are other classes (Quanto, HQQ, bitsandbytes, PyTorch's quantized) or hold tensor
    subclasses (torchao)."""
    import torch

    plain_classes = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.LayerNorm)

    def plain_dtype(module: torch.nn.Module) -> str | None:
        weight = getattr(module, "weight", None)
        if type(module) not in plain_classes or type(weight) not in (torch.Tensor, torch.nn.Parameter):
            return None
        return str(weight.dtype).removeprefix("torch.") if weight.dtype.is_floating_point else None

    modules = dict(model.named_modules())
    groups: dict[str, list[str]] = {}  # "<part> <dtype>" -> module names
    linears = list(linears)
    for name, module in modules.items():
        dtype = plain_dtype(module)
        if dtype is None:
            continue
        if name.endswith("embed_tokens"):
            tied = HEAD in modules and getattr(modules[HEAD], "weight", None) is module.weight
            part = "token embedding + LM head (tied)" if tied else "token embedding"
        elif name == HEAD:
            if getattr(model.get_input_embeddings(), "weight", None) is module.weight:
                continue  # the embedding, counted above
            part = "LM head"
        elif name.endswith("embed_positions"):
            part = "positional embeddings"
        elif isinstance(module, torch.nn.Conv1d):
            part = "conv stem"
        elif isinstance(module, torch.nn.LayerNorm):
            part = "layer norms"
        elif name in linears:
            part = "linear"
        else:
            part = "other"
        groups.setdefault(f"{part} {dtype}", []).append(name)
    described = []
    for key, names in groups.items():
        part, dtype = key.rsplit(" ", 1)
        if part == "linear":
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            described.append(f"{len(names)} of {len(linears)} linear layers {dtype}: {shown}")
        else:
            described.append(f"{part} {dtype}")
    return described


def linear_bits_per_weight(model: torch.nn.Module, layers: dict[str, int]) -> float:
    """Serialized bits per weight of the given (formerly nn.Linear) layers: each layer's state dict without
    its bias, saved with torch.save, so packed data, scales and zero points all count. Measuring the saved
    bytes, not tensor.nbytes, matters because quantized tensor subclasses report their logical dtype."""
    import torch

    modules = dict(model.named_modules())
    total_bytes = 0
    for name in layers:
        state = {k: v for k, v in modules[name].state_dict().items() if not k.endswith("bias")}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        total_bytes += buffer.getbuffer().nbytes
    return 8 * total_bytes / sum(layers.values())
