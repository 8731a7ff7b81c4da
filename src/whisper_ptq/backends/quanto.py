"""Optimum-Quanto: int8/int4/int2/fp8 weights, optionally int8/fp8 activations with calibrated static scales.

Every selected nn.Linear becomes a `QLinear` (`quantize(model, include=...)`) and is frozen (`freeze`), so
the fp32 weights are dropped and the packed ones are what runs and what is saved. 8-bit weights are
symmetric per output channel (absmax); int4/int2 are affine per group of 128 input features (quanto
picks the group itself). Static recipes then run the model over the calibration audio under
`Calibration`, which records per-tensor absmax input/output scales with momentum.

Three things found by running quanto 0.2.7 with torch 2.13 / transformers 5 (see the tests):

- The LM head `proj_out` never quantizes its output activations. A QLinear with activations quantizes
  its output in a forward hook, so the logits would come out as an fp8/int8 `ActivationQBytesTensor`;
  transformers' logits processors then call `torch.where(mask, -inf, scores)` with the logits as the
  third (`other`) argument, which quanto's `where` dispatch refuses (`NotImplementedError`: it only
  accepts a quantized tensor in the second slot). Quantizing the logits would also be wrong in itself:
  greedy search takes their argmax, and 8-bit logits tie. So the head is weight-only when it is
  quantized at all (by default it stays fp32, tied to the token embedding, stored once).
- Calibration runs as teacher forcing: the fp32 model first transcribes the calibration audio, then one
  forward pass per batch feeds those transcripts to the quantized decoder. The decoder sees realistic
  prefixes, as under `generate`, but `Calibration`'s per-op Python hook runs once per batch instead of
  once per generated token (generating under `Calibration` was several times slower than inference).
- Calibration in quanto's default "streamline" mode switches off output quantization of modules whose
  outputs only feed ops without a quantized kernel; in Whisper that is every Linear (each feeds the
  attention reshape, GELU or a residual add), so a calibrated model quantizes Linear inputs only. That
  decision lives in removed forward hooks, in neither the state dict nor `quantization_map`, so `save`
  records it and `load` replays it: a reloaded model would otherwise quantize every Linear output.

`save` lays the model out as quanto's own `QuantizedTransformersModel.save_pretrained` does (transformers'
model.safetensors and config.json, `quanto_qmap.json`), plus the streamline record. transformers cannot load
it (its Quanto integration quantizes on load only and is not serializable); `optimum.quanto.requantize`
rebuilds it on an empty model, which is what the export's loader does.

Attention is set to transformers' SDPA, the fp32 reference's default, and recorded. "eager" runs too (checked
on tiny.en): after calibration both get float q/k/v; they differ only in the one calibration pass before
streamline applies, where eager attention multiplies int8 q/k and requantizes the softmax.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends.base import (
    Backend,
    BuildContext,
    Built,
    Loader,
    Param,
    head_kept,
    keep_head_param,
    save_transformers,
    target_linears,
    transformers_loader,
)
from whisper_ptq.errors import UserError
from whisper_ptq.models.names import HEAD
from whisper_ptq.recipes import OptionValue, Recipe

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from whisper_ptq.engines.hf import HFTranscriber

WEIGHTS = ("int8", "int4", "int2", "fp8")
ACTIVATIONS = (None, "int8", "fp8")
QTYPE_NAMES = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "fp8": "qfloat8"}
ATTENTION = "sdpa"
CALIBRATION_MOMENTUM = 0.9
CALIBRATION_BATCH = 8
STATE_FILE = "model.safetensors"
MAP_FILE = "quanto_qmap.json"  # the name QuantizedTransformersModel gives it
STREAMLINE_FILE = "streamline.json"


def qtype(name: str | None) -> Any:
    from optimum.quanto import qtypes

    return None if name is None else qtypes[QTYPE_NAMES[name]]


def quantize_linears_(model: nn.Module, recipe: Recipe) -> None:
    """Swap the recipe's Linears for frozen QLinears; the head, if selected, gets weights only (see the
    module docstring)."""
    from optimum.quanto import freeze, quantize

    targets = target_linears(model, recipe, lm_head=True)
    body = [name for name in targets if name != HEAD]
    weights, activations = qtype(recipe.weights), qtype(recipe.activations)
    if body:
        quantize(model, weights=weights, activations=activations, include=body)
    if HEAD in targets:
        quantize(model, weights=weights, include=HEAD)
    freeze(model)


def decoder_prompt(config: Any) -> list[int]:
    """The tokens Whisper's `generate` forces before the text and strips from what it returns: start of
    transcript, then language and task (English transcription, as `HFTranscriber` asks) when multilingual,
    then no-timestamps."""
    prompt = [config.decoder_start_token_id]
    if getattr(config, "is_multilingual", False):
        prompt += [config.lang_to_id["<|en|>"], config.task_to_id["transcribe"]]
    return [*prompt, config.no_timestamps_token_id]


def fp32_transcripts(transcriber: HFTranscriber, audios: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, decoder input ids) per calibration batch: the unquantized model's own transcripts,
    prompt included, to be replayed by teacher forcing."""
    import torch

    model = transcriber.model
    prompt = torch.tensor(decoder_prompt(model.generation_config), device=transcriber.device)
    batches = []
    for start in range(0, len(audios), CALIBRATION_BATCH):
        features = transcriber.features(audios[start : start + CALIBRATION_BATCH])
        with torch.no_grad():
            ids = model.generate(features, **transcriber.generate_kwargs)
        batches.append((features, torch.cat([prompt.expand(len(ids), -1), ids], dim=1)))
    return batches


def calibrate_(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Record activation scales: one teacher-forced pass of encoder and decoder per calibration batch."""
    import torch
    from optimum.quanto import Calibration

    with torch.no_grad(), Calibration(momentum=CALIBRATION_MOMENTUM):
        for features, ids in batches:
            model(input_features=features, decoder_input_ids=ids)


def output_unquantized(model: nn.Module) -> list[str]:
    """QLinears whose output quantization calibration switched off (streamline): their hook is gone."""
    from optimum.quanto import QModuleMixin

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, QModuleMixin)
        and "output" in module._quantize_hooks
        and module._quantize_hooks["output"].id not in module._forward_hooks
    ]


class QuantoBackend(Backend):
    library = "quanto"
    description = "Optimum-Quanto QLinear: int8/int4/int2/fp8 weights, int8/fp8 static activations"
    requires = {"optimum.quanto": "optimum-quanto"}
    params = {
        "weights": Param(str, "int8", WEIGHTS, "weight dtype (8-bit per channel, 4/2-bit per group of 128)"),
        "activations": Param(
            str, None, ACTIVATIONS, "activation dtype, per-tensor scales calibrated on the calibration audio"
        ),
        "keep": keep_head_param(kept_by_default=True),
    }
    named = {
        "quanto-int8": (
            "quantize(weights=qint8) + freeze: int8 symmetric per-channel weights, float activations; "
            "weight-only, though the seed paper labels this row 'Quanto int8 (dyn.)'",
            {"weights": "int8"},
        ),
        "quanto-int4": ("quantize(weights=qint4): int4 affine weights, groups of 128", {"weights": "int4"}),
        "quanto-int2": ("quantize(weights=qint2): int2 affine weights, groups of 128", {"weights": "int2"}),
        "quanto-fp8": (
            "quantize(weights=qfloat8): fp8 e4m3 per-channel weights, float activations",
            {"weights": "fp8"},
        ),
        "quanto-int8-fp8-static": (
            "quantize(weights=qint8, activations=qfloat8) + Calibration: int8 weights, fp8 e4m3 activations "
            "with calibrated per-tensor scales (the seed paper's 'Quanto int8/fp8 (stat.)' row)",
            {"weights": "int8", "activations": "fp8"},
        ),
        "quanto-int8-int8-static": (
            "quantize(weights=qint8, activations=qint8) + Calibration: int8 weights and calibrated "
            "per-tensor int8 activations",
            {"weights": "int8", "activations": "int8"},
        ),
    }

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        weights, activations = str(values["weights"]), values["activations"]
        eight_bit = weights in ("int8", "fp8")
        if activations is not None and not eight_bit:
            # 2/4-bit quanto weights carry no activation type: every quantized input would be dequantized
            # again before the matmul, so the combination only adds error.
            raise UserError(
                f"recipe {name!r}: quanto quantizes activations only with 8-bit weights; "
                f"valid: weights=int8|fp8 with activations=int8|fp8, or activations=none"
            )
        return Recipe(
            name=name,
            library=self.library,
            scheme="weight-only" if activations is None else "static",
            weights=weights,
            activations=None if activations is None else str(activations),
            granularity="per-channel" if eight_bit else "per-group",
            group_size=None if eight_bit else 128,
            symmetric=eight_bit,
            keep=(HEAD,) if values["keep"] else (),
            devices=("cpu", "cuda"),
            options=(("attn_implementation", ATTENTION),),
            description=description or f"quanto {weights} weights, {activations or 'float'} activations",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        from whisper_ptq.engines.hf import HFTranscriber

        model = self._prepare(bundle, ctx)
        transcriber = HFTranscriber(model, bundle.processor, device=ctx.device)
        info: dict[str, Any] = {}
        batches = []
        if recipe.needs_calibration:
            if ctx.calibration is None:
                raise UserError(f"recipe {recipe.name} needs calibration audio (--calibration)")
            audios = ctx.calibration()
            batches = fp32_transcripts(transcriber, audios)
            info.update(calibration_utterances=len(audios), calibration=ctx.calibration_spec)
        quantize_linears_(model, recipe)
        if batches:
            calibrate_(model, batches)
            info["linear_outputs_left_float"] = len(output_unquantized(model))
        return Built(transcriber, model, {**self._info(model, recipe), **info})

    def save(self, quantized: Built, out_dir: Path) -> None:
        """quanto's serialization: the safetensors state dict + the `quantization_map` (see `requantize`)."""
        from optimum.quanto import quantization_map

        model = quantized.model
        save_transformers(model, out_dir)
        (out_dir / MAP_FILE).write_text(json.dumps(quantization_map(model), indent=1) + "\n")
        if unquantized := output_unquantized(model):
            (out_dir / STREAMLINE_FILE).write_text(json.dumps({"output_unquantized": unquantized}) + "\n")

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        import torch
        from optimum.quanto import requantize
        from safetensors.torch import load_file

        from whisper_ptq.engines.hf import HFTranscriber

        missing = [name for name in (STATE_FILE, MAP_FILE) if not (saved_dir / name).is_file()]
        if missing:
            raise UserError(f"{saved_dir} holds no quanto model ({', '.join(missing)} missing)")
        model = self._prepare(bundle, ctx)
        state = load_file(str(saved_dir / STATE_FILE), device=str(ctx.device))
        qmap = json.loads((saved_dir / MAP_FILE).read_text())
        requantize(model, state, qmap, device=torch.device(ctx.device))
        if HEAD not in qmap:  # saved once, as the embedding; requantize gave the head a parameter of its own
            model.get_submodule(HEAD).weight = model.get_input_embeddings().weight
        streamline = saved_dir / STREAMLINE_FILE
        for name in json.loads(streamline.read_text())["output_unquantized"] if streamline.is_file() else ():
            model.get_submodule(name).disable_output_quantization()
        transcriber = HFTranscriber(model, bundle.processor, device=ctx.device)
        return Built(transcriber, model, self._info(model, recipe))

    def loaders(self, recipe: Recipe, english_only: bool) -> list[Loader]:
        imports = [
            "import json",
            "from optimum.quanto import requantize",
            "from safetensors.torch import load_file",
            "from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration",
        ]
        load = f"""\
with torch.device("meta"):  # an empty model: requantize swaps in quanto's layers, then loads the weights
    model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(model_dir))
with open(f"{{model_dir}}/{MAP_FILE}") as handle:
    requantize(model, load_file(f"{{model_dir}}/{STATE_FILE}"), json.load(handle))
model.tie_weights()  # an fp32 head is stored once, as the token embedding
model.generation_config = GenerationConfig.from_pretrained(model_dir)
model.eval()"""
        if recipe.activations:
            load += f"""
with open(f"{{model_dir}}/{STREAMLINE_FILE}") as handle:  # outputs calibration left unquantized
    for name in json.load(handle)["output_unquantized"]:
        model.get_submodule(name).disable_output_quantization()"""
        note = (
            "transformers' Quanto integration cannot save or load quantized weights; "
            "`optimum.quanto.requantize` rebuilds the model from model.safetensors and quanto_qmap.json."
        )
        return [
            transformers_loader("optimum-quanto", ("optimum-quanto", "safetensors"), imports, load, english_only, note)
        ]

    @staticmethod
    def _prepare(bundle: Any, ctx: BuildContext) -> nn.Module:
        model = bundle.model.to(ctx.device).eval()
        model.set_attn_implementation(ATTENTION)
        return model

    @staticmethod
    def _info(model: nn.Module, recipe: Recipe) -> dict[str, Any]:
        import optimum.quanto
        from optimum.quanto import QModuleMixin

        quantized = [name for name, module in model.named_modules() if isinstance(module, QModuleMixin)]
        return {
            "quanto": optimum.quanto.__version__,
            "quantized_linear": len(quantized),
            "kept_full_precision": [HEAD] if head_kept(recipe) else [],
            HEAD: "kept fp32, tied to model.decoder.embed_tokens (stored once)"
            if head_kept(recipe)
            else "weights quantized, output activations never (logits stay float); untied from the embedding",
            "attn_implementation": model.config._attn_implementation,
        }
