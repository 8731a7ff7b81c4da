"""CTranslate2, the inference engine behind faster-whisper: a separate C++ runtime, its own weight formats.

`quantize` converts the transformers model with CTranslate2's own converter (`TransformersConverter`, which
quantizes at conversion time) and runs it with `ctranslate2.models.Whisper`. Decoding mirrors
`HFTranscriber`: the same log-mel features, greedy search, the same start prompt, the same suppressed tokens
(the converter copies them from the generation config) and the same length limit.

What CTranslate2 quantizes (read back from model.bin): every Linear, both encoder convolutions and the token
embedding, which is also the tied output projection; int8 is symmetric per output row, int16 one scale per
tensor. Its int8 GEMM quantizes activations per row at run time. On x86 CPUs it uses Intel MKL only on Intel
processors (oneDNN elsewhere), and int16 exists only through MKL: on AMD run with CT2_USE_MKL=1 to get it.

An export is a faster-whisper model folder: the converted model.bin, config.json and vocabulary.json, with the
tokenizer.json and preprocessor_config.json the export adds beside them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends.base import (
    CLIP_IMPORTS,
    CLIP_PACKAGES,
    READ_CLIP,
    Backend,
    BuildContext,
    Built,
    Loader,
    Param,
    import_block,
)
from whisper_ptq.errors import UserError
from whisper_ptq.models.names import english_prompt
from whisper_ptq.recipes import OptionValue, Recipe

if TYPE_CHECKING:
    import torch

    from whisper_ptq.engines.ct2 import CT2Transcriber


@dataclass(frozen=True)
class ComputeType:
    weights: str
    activations: str | None
    granularity: str
    devices: tuple[str, ...]


PIPELINES = ("common", "native")
COMPUTE_TYPES = {
    "int8": ComputeType("int8", "int8", "per-channel", ("cpu", "cuda")),
    "int8_float32": ComputeType("int8", "int8", "per-channel", ("cpu", "cuda")),
    "int16": ComputeType("int16", "int16", "per-tensor", ("cpu",)),
    "float32": ComputeType("fp32", None, "per-tensor", ("cpu", "cuda")),
    "float16": ComputeType("fp16", None, "per-tensor", ("cuda",)),
    "int8_float16": ComputeType("int8", "int8", "per-channel", ("cuda",)),
    "bfloat16": ComputeType("bf16", None, "per-tensor", ("cuda",)),
}


class CTranslate2Backend(Backend):
    library = "ctranslate2"
    description = "CTranslate2 (faster-whisper's engine): its own converter, int8/int16 formats and kernels"
    requires = {"ctranslate2": "ctranslate2"}
    params = {
        "compute_type": Param(str, "int8", tuple(COMPUTE_TYPES), "CTranslate2 compute type (weights_activations)"),
        "pipeline": Param(
            str, "common", PIPELINES, "common: the study's decoding; native: faster-whisper's WhisperModel.transcribe"
        ),
    }
    named = {
        "ct2-int8": (
            "CTranslate2 int8: int8 weights and GEMMs, fp32 elsewhere (faster-whisper's CPU default)",
            {},
        ),
        "ct2-int8-float32": (
            "CTranslate2 int8_float32 (the same as int8 on CPU)",
            {"compute_type": "int8_float32"},
        ),
        "ct2-int16": ("CTranslate2 int16 weights and GEMMs (Intel MKL only)", {"compute_type": "int16"}),
        "ct2-float32": (
            "CTranslate2 float32: no quantization, an independent engine",
            {"compute_type": "float32"},
        ),
        "ct2-float16": ("CTranslate2 float16 (GPU)", {"compute_type": "float16"}),
        "ct2-int8-float16": (
            "CTranslate2 int8 weights, fp16 elsewhere (GPU)",
            {"compute_type": "int8_float16"},
        ),
        "faster-whisper-int8": (
            "faster-whisper's own pipeline (WhisperModel.transcribe, greedy, no timestamps) on CTranslate2 int8",
            {"pipeline": "native"},
        ),
        "faster-whisper-float32": (
            "faster-whisper's own pipeline on CTranslate2 float32",
            {"compute_type": "float32", "pipeline": "native"},
        ),
    }

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        compute_type, pipeline = str(values["compute_type"]), str(values["pipeline"])
        spec = COMPUTE_TYPES[compute_type]
        # Recorded only when not the default, so the stored identity of the common-pipeline recipes is unchanged.
        native = (("pipeline", pipeline),) if pipeline != "common" else ()
        return Recipe(
            name=name,
            library=self.library,
            scheme="dynamic" if spec.activations else "reference",
            weights=spec.weights,
            activations=spec.activations,
            granularity=spec.granularity,
            devices=spec.devices,
            options=(("compute_type", compute_type), *native),
            description=description or f"CTranslate2 {compute_type}" + (f", {pipeline} pipeline" if native else ""),
        )

    def check(self, recipe: Recipe, device: str) -> str | None:
        if native(recipe) and importlib.util.find_spec("faster_whisper") is None:
            return "library not installed: pip install faster-whisper"
        if reason := super().check(recipe, device):
            return reason
        import ctranslate2

        kind = device.split(":")[0]
        compute_type = str(recipe.option("compute_type"))
        try:
            supported = ctranslate2.get_supported_compute_types(kind)
        except (RuntimeError, ValueError) as exc:
            return f"CTranslate2 cannot use {kind}: {exc}"
        if compute_type in supported:
            return None
        hint = " (CTranslate2 has int16 only through Intel MKL: on a non-Intel CPU set CT2_USE_MKL=1)"
        return f"CTranslate2 supports {', '.join(sorted(supported))} on this {kind}, not {compute_type}" + (
            hint if compute_type == "int16" else ""
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        import ctranslate2

        if recipe.modules or recipe.keep:
            raise UserError(f"recipe {recipe.name!r}: CTranslate2 quantizes every layer, it cannot select modules")
        workspace = tempfile.TemporaryDirectory(prefix="whisper-ptq-ct2-")
        model_dir = Path(workspace.name) / "model"
        with tempfile.TemporaryDirectory(prefix="whisper-ptq-hf-") as scratch:
            source = transformers_dir(bundle, Path(scratch))
            # The converter reloads the model from disk: a second fp32 copy while it runs, then freed.
            converter = ctranslate2.converters.TransformersConverter(str(source))
            converter.convert(str(model_dir), quantization=compute_type(recipe), force=True)
        if native(recipe):
            # faster-whisper reads tokenizer.json and preprocessor_config.json from the model folder (without
            # them it downloads a tokenizer from the hub)
            bundle.processor.save_pretrained(model_dir)
        return self._built(model_dir, bundle, recipe, ctx, workspace)

    def _built(self, model_dir: Path, bundle: Any, recipe: Recipe, ctx: BuildContext, workspace: Any = None) -> Built:
        if native(recipe):
            import faster_whisper
            import torch

            from whisper_ptq.engines.faster_whisper import STUDY_SETTINGS, FasterWhisperTranscriber

            threads = torch.get_num_threads()
            transcriber = FasterWhisperTranscriber(model_dir, compute_type(recipe), ctx.device, threads, workspace)
            info = {
                "engine": f"faster-whisper {faster_whisper.__version__} WhisperModel.transcribe, {threads} threads",
                "pipeline": "native",
                "transcribe_settings": STUDY_SETTINGS,
                "compute_type": transcriber.model.model.compute_type,
                **stored_weights(model_dir / "model.bin"),
            }
            return Built(transcriber, model_dir, info)
        from whisper_ptq.engines.ct2 import CT2Transcriber

        transcriber = CT2Transcriber.for_bundle(model_dir, bundle, compute_type(recipe), ctx.device, workspace)
        return Built(transcriber, model_dir, ct2_info(transcriber))

    def save(self, quantized: Built, out_dir: Path) -> None:
        """The converted CTranslate2 directory as is: faster-whisper and ctranslate2 load it directly."""
        shutil.copytree(quantized.model, out_dir, dirs_exist_ok=True)

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        if not (saved_dir / "model.bin").is_file():
            raise UserError(f"{saved_dir} holds no CTranslate2 model (model.bin is missing)")
        return self._built(saved_dir, bundle, recipe, ctx)

    def loaders(self, recipe: Recipe, english_only: bool) -> list[Loader]:
        device = "cpu" if "cpu" in recipe.devices else "cuda"
        kind = compute_type(recipe)
        faster_whisper = f"""\
import sys

from faster_whisper import WhisperModel

model = WhisperModel(sys.argv[1], device="{device}", compute_type="{kind}")
for clip in sys.argv[2:]:
    segments, _ = model.transcribe(
        clip, language="en", beam_size=1, temperature=0.0, without_timestamps=True, condition_on_previous_text=False
    )
    print("".join(segment.text for segment in segments))
"""
        prompt = list(english_prompt(english_only))
        header = import_block(
            [*CLIP_IMPORTS, "import ctranslate2", "import numpy as np", "from transformers import WhisperProcessor"]
        )
        ctranslate2_script = f"""\
{header}

model_dir = sys.argv[1]
model = ctranslate2.models.Whisper(model_dir, device="{device}", compute_type="{kind}")
processor = WhisperProcessor.from_pretrained(model_dir)
prompt = processor.tokenizer.convert_tokens_to_ids({json.dumps(prompt)})
for clip in sys.argv[2:]:
{READ_CLIP}
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    results = model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features, np.float32)),
        [prompt],
        beam_size=1,
        max_length=2 * (448 - len(prompt)),  # stops where transformers' generate stops
        suppress_blank=True,
        suppress_tokens=[-1],
    )
    print(processor.tokenizer.decode(results[0].sequences_ids[0], skip_special_tokens=True))
"""
        # Features differ between the two: faster-whisper pads the log-mel frames as OpenAI's whisper does (zeros
        # after the audio's frames), transformers pads the audio. The script of the pipeline that was measured
        # prints the measured transcripts; the other can differ by a word.
        measured_by_faster_whisper = native(recipe)
        differs = "so a transcript can differ by a word from the measured one."
        return [
            Loader(
                "faster-whisper",
                ("faster-whisper",),
                faster_whisper,
                exact=measured_by_faster_whisper,
                note="faster-whisper itself, as whisper-ptq measured it (WhisperModel.transcribe, greedy, no "
                "timestamps)."
                if measured_by_faster_whisper
                else "faster-whisper pads the log-mel frames as OpenAI's whisper does (zeros after the audio's "
                f"frames), not the audio as transformers does, {differs}",
            ),
            Loader(
                "ctranslate2",
                ("ctranslate2", "transformers", *CLIP_PACKAGES),
                ctranslate2_script,
                exact=not measured_by_faster_whisper,
                note="CTranslate2 with transformers' features (the audio padded, not the log-mel frames as "
                f"faster-whisper, which was measured, pads them), {differs}"
                if measured_by_faster_whisper
                else "CTranslate2 itself, decoding as whisper-ptq measured: transformers' features, greedy search, "
                "the same prompt and length limit.",
            ),
        ]


def compute_type(recipe: Recipe) -> str:
    return str(recipe.option("compute_type"))


def native(recipe: Recipe) -> bool:
    """Whether the recipe runs faster-whisper's own pipeline instead of the study's decoding."""
    return recipe.option("pipeline", "common") == "native"


def transformers_dir(bundle: Any, scratch: Path) -> Path:
    """A local transformers directory of the bundle's model (written to `scratch` for hub models)."""
    if bundle.hf_dir is not None:
        return Path(bundle.hf_dir)
    bundle.model.save_pretrained(scratch)
    bundle.processor.save_pretrained(scratch)
    return scratch


def ct2_info(transcriber: CT2Transcriber) -> dict[str, Any]:
    import ctranslate2

    return {
        "engine": f"ctranslate2 {ctranslate2.__version__}",
        "compute_type": transcriber.model.compute_type,
        **stored_weights(transcriber.model_dir / "model.bin"),
    }


def stored_weights(model_bin: Path) -> dict[str, Any]:
    """Which weights CTranslate2 stored in which dtype, and the stored bits per Linear weight (raw bytes of
    weights and scales, biases excluded), the CT2 counterpart of `base.linear_bits_per_weight`."""
    from whisper_ptq.models.ct2_format import read_ct2_model

    variables = read_ct2_model(model_bin).variables
    groups = {"linear": "/linear_", "conv": "/conv", "token_embedding": "decoder/embeddings/"}
    dtypes = {
        group: sorted({str(v.dtype).removeprefix("torch.") for n, v in variables.items() if _is_weight(n, marker)})
        for group, marker in groups.items()
    }
    linear = [n for n in variables if _is_weight(n, groups["linear"])]
    bits = sum(8 * (variables[n].nbytes + _nbytes(variables.get(n + "_scale"))) for n in linear)
    weights = sum(variables[n].numel() for n in linear)
    return {"stored_dtypes": dtypes, "linear_bits_per_weight": bits / weights}


def _is_weight(name: str, marker: str) -> bool:
    return marker in name and name.endswith("/weight")


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.nbytes
