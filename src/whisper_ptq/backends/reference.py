"""The unquantized references: fp32, and bf16 weights + compute (AMX on recent Xeons)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from whisper_ptq.backends.base import Backend, BuildContext, Built, Loader, Param, transformers_loader
from whisper_ptq.errors import UserError
from whisper_ptq.recipes import OptionValue, Recipe

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch dtype names


class ReferenceBackend(Backend):
    library = "reference"
    description = "transformers model in full (fp32) or half (bf16/fp16) precision"
    params = {"dtype": Param(str, "fp32", tuple(DTYPES), "weight and compute dtype")}
    named = {
        "fp32": ("fp32 reference (no quantization)", {"dtype": "fp32"}),
        "bf16": ("bf16 weights and compute (AMX/AVX-512 bf16 on CPU)", {"dtype": "bf16"}),
        "fp16": ("fp16 weights and compute (GPU)", {"dtype": "fp16"}),
    }

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        dtype = str(values["dtype"])
        return Recipe(
            name=name,
            library=self.library,
            scheme="reference",
            weights=dtype,
            granularity="per-tensor",
            devices=("cuda",) if dtype == "fp16" else ("cpu", "cuda"),
            description=description or f"{dtype} reference",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        import torch

        from whisper_ptq.engines.hf import HFTranscriber

        dtype = getattr(torch, DTYPES[recipe.weights])
        model = bundle.model.to(device=ctx.device, dtype=dtype)
        transcriber = HFTranscriber(model, bundle.processor, device=ctx.device, input_dtype=dtype)
        return Built(transcriber, model)

    def save(self, quantized: Built, out_dir: Path) -> None:
        """A transformers model folder (config.json, generation_config.json, model.safetensors)."""
        quantized.model.save_pretrained(out_dir)

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        from transformers import WhisperForConditionalGeneration

        if not (saved_dir / "model.safetensors").is_file():
            raise UserError(f"{saved_dir} holds no transformers model (model.safetensors is missing)")
        bundle.model = WhisperForConditionalGeneration.from_pretrained(saved_dir).eval()
        return self.quantize(bundle, recipe, ctx)

    def loaders(self, recipe: Recipe, english_only: bool) -> list[Loader]:
        load = "model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()"
        imports = ["from transformers import WhisperForConditionalGeneration"]
        return [transformers_loader("transformers", (), imports, load, english_only)]
