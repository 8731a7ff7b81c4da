"""bitsandbytes: LLM.int8 (`Linear8bitLt`) and 4-bit NF4/FP4 (`Linear4bit`, QLoRA's formats), on CPU or GPU.

Every nn.Linear except the LM head (tied to the token embedding, kept fp32 like transformers' bnb
integration keeps it) is swapped for the bnb module, and its weight is quantized where it lies, one layer at
a time, so no second fp32 copy of the model exists. bitsandbytes >= 0.49 ships real CPU kernels for both.

CPU caveats found by reading bnb 0.50.2:
- On CPUs with AVX512-BF16, `Linear4bit` in eval mode repacks its weight on the first call and runs a fused
  kernel that computes in bf16 whatever `compute_dtype` says. `compute_dtype=fp32` therefore switches that
  kernel off (dequantize to fp32, then an fp32 matmul), so the parameter means what it says; `compute_dtype=
  bf16` keeps bnb's default CPU path.
- Saving a repacked layer runs bnb's "best-effort" inverse, which leaves non-nested absmax scales transposed
  and in bf16: the file and the live model are both corrupted. `save` refuses that case (save before the
  first transcription, as the evaluator does).
- LLM.int8 casts activations to fp16 and logs that on every matmul call; the notice is filtered out.

`save` writes what transformers' own bitsandbytes integration saves (`BitsAndBytesConfig` in config.json,
the bnb modules' state dicts in model.safetensors), so `WhisperForConditionalGeneration.from_pretrained`
loads an export on CPU or GPU; the config is read back from the layers, which carry their settings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends.base import (
    Backend,
    BuildContext,
    Built,
    Loader,
    Param,
    replace_linears_,
    save_transformers,
    target_linears,
    transformers_loader,
)
from whisper_ptq.errors import UserError
from whisper_ptq.models.names import HEAD
from whisper_ptq.recipes import OptionValue, Recipe

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ("int8", "nf4", "fp4")
COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # torch dtype names
BLOCKSIZES = (32, 64, 128, 256)
DEFAULT_THRESHOLD = 6.0
DEFAULT_BLOCKSIZE = 64
KEPT = (HEAD,)  # tied to model.decoder.embed_tokens, which no recipe here quantizes


class BitsAndBytesBackend(Backend):
    library = "bnb"
    description = "bitsandbytes LLM.int8 (Linear8bitLt) and 4-bit NF4/FP4 (Linear4bit) weight quantization"
    requires = {"bitsandbytes": "bitsandbytes"}
    params = {
        "format": Param(str, "nf4", FORMATS, "LLM.int8 with outlier decomposition, or 4-bit NormalFloat/Float"),
        "double_quant": Param(bool, False, None, "4-bit only: quantize the per-block absmax scales to 8 bit"),
        "threshold": Param(
            float, DEFAULT_THRESHOLD, None, "int8 only: activation outlier threshold (0 = all-int8 matmul)"
        ),
        "compute_dtype": Param(
            str, "fp32", tuple(COMPUTE_DTYPES), "4-bit only: matmul dtype (bf16 allows the fused CPU kernel)"
        ),
        "blocksize": Param(int, DEFAULT_BLOCKSIZE, BLOCKSIZES, "4-bit only: weights sharing one absmax scale"),
    }
    named = {
        "bnb-int8": (
            "LLM.int8: Linear8bitLt, per-row absmax int8 weights, activation columns above 6.0 kept fp",
            {"format": "int8"},
        ),
        "bnb-nf4": ("Linear4bit nf4, blocks of 64, fp32 compute (the seed paper's 'BNB nf4' row)", {}),
        "bnb-fp4": ("Linear4bit fp4, blocks of 64, fp32 compute", {"format": "fp4"}),
        "bnb-nf4-dq": (
            "Linear4bit nf4 with double quantization (absmax scales stored as 8-bit blocks of 256)",
            {"double_quant": "true"},
        ),
    }

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        fmt = str(values["format"])
        options: tuple[tuple[str, OptionValue], ...]
        if fmt == "int8":
            refuse_4bit_options(name, values)
            options = (("threshold", float(values["threshold"])),)
        else:
            if values["threshold"] != DEFAULT_THRESHOLD:
                raise UserError(f"recipe {name!r}: threshold applies to format=int8 only, not {fmt}")
            options = (
                ("blocksize", int(values["blocksize"])),
                ("compute_dtype", str(values["compute_dtype"])),
                ("double_quant", bool(values["double_quant"])),
            )
        return Recipe(
            name=name,
            library=self.library,
            # LLM.int8 quantizes activations per row at run time; 4-bit dequantizes weights for the matmul.
            scheme="dynamic" if fmt == "int8" else "weight-only",
            weights=fmt,
            activations="int8" if fmt == "int8" else None,
            granularity="per-channel" if fmt == "int8" else "per-group",
            group_size=None if fmt == "int8" else int(values["blocksize"]),
            keep=KEPT,
            devices=("cpu", "cuda"),
            options=options,
            description=description or f"bitsandbytes {fmt}",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        model = bundle.model
        replace_linears_(
            model, target_linears(model, recipe), lambda linear: quantized_linear(linear, recipe, ctx.device)
        )
        model.to(ctx.device)
        return self._quantized(model, bundle, recipe, ctx)

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        from safetensors.torch import load_file

        path = saved_dir / "model.safetensors"
        if not path.is_file():
            raise UserError(f"{saved_dir} holds no bitsandbytes model (model.safetensors is missing)")
        state = load_file(path, device=str(ctx.device))
        model = bundle.model
        replace_linears_(model, target_linears(model, recipe), lambda linear: empty_linear(linear, recipe))
        for name in bnb_layers(model):
            restore_linear_(model.get_submodule(name), name, state, ctx.device)
        # What is left are the unquantized weights (embeddings, convs, norms), saved as plain tensors.
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise UserError(f"{path} does not match recipe {recipe.name!r}: unexpected {unexpected[0]}")
        return self._quantized(model.to(ctx.device), bundle, recipe, ctx)

    def save(self, quantized: Built, out_dir: Path) -> None:
        if any(is_repacked_for_cpu(module) for module in quantized.model.modules()):
            raise UserError(
                "bitsandbytes cannot save a 4-bit model after its fused CPU kernel has repacked the weights "
                "(its inverse conversion corrupts the scales); save before transcribing"
            )
        save_transformers(quantized.model, out_dir, transformers_config(quantized.model))

    def loaders(self, recipe: Recipe, english_only: bool) -> list[Loader]:
        load = "model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()"
        imports = ["from transformers import WhisperForConditionalGeneration"]
        note = "transformers rebuilds the bitsandbytes layers from the `quantization_config` in config.json."
        if recipe.weights != "int8" and recipe.option("compute_dtype") == "fp32":
            # transformers' Linear4bit keeps bnb's default: the fused bf16 CPU kernel where the CPU has it
            imports.append("from bitsandbytes.nn import Linear4bit")
            load += (
                "\nfor module in model.modules():  # compute in fp32 as measured, not in bnb's fused bf16 CPU kernel"
                "\n    if isinstance(module, Linear4bit):"
                "\n        module.support_avx512bf16_for_cpu = False"
            )
        return [transformers_loader("transformers", ("bitsandbytes", "accelerate"), imports, load, english_only, note)]

    @staticmethod
    def _quantized(model: nn.Module, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        import bitsandbytes

        from whisper_ptq.engines.hf import HFTranscriber

        info: dict[str, Any] = {
            "kept_full_precision": list(recipe.keep),
            "bitsandbytes": bitsandbytes.__version__,
        }
        if recipe.weights == "int8":
            silence_fp16_cast_notice()
            info["int8_matmul"] = "activations cast to fp16, int8 row-wise quantized, outlier columns in fp16"
        else:
            info["kernel_4bit"] = kernel_4bit(model, ctx.device)
        transcriber = HFTranscriber(model, bundle.processor, device=ctx.device)
        return Built(transcriber, model, info)


class Fp16CastNotice(logging.Filter):
    """Drops bnb's 'MatMul8bitLt: inputs will be cast from torch.float32 to float16' warning, logged on every
    int8 matmul (thousands of lines per utterance) although it states a fixed property of LLM.int8."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def silence_fp16_cast_notice() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, Fp16CastNotice) for f in logger.filters):
        logger.addFilter(Fp16CastNotice())


def is_repacked_for_cpu(module: nn.Module) -> bool:
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def refuse_4bit_options(name: str, values: dict[str, OptionValue]) -> None:
    defaults = {"double_quant": False, "compute_dtype": "fp32", "blocksize": DEFAULT_BLOCKSIZE}
    for key, default in defaults.items():
        if values[key] != default:
            raise UserError(f"recipe {name!r}: {key} applies to the 4-bit formats (nf4, fp4) only, not int8")


def transformers_config(model: nn.Module) -> Any:
    """The `BitsAndBytesConfig` transformers needs to rebuild the model's layers: read from the layers
    themselves, every Linear left unconverted named in `llm_int8_skip_modules`. The 4-bit block size has no
    config field: it is stored with each layer's quantization state, which transformers restores."""
    import bitsandbytes as bnb
    from torch import nn
    from transformers import BitsAndBytesConfig

    layers = [model.get_submodule(name) for name in bnb_layers(model)]
    skip = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    first = layers[0]
    if isinstance(first, bnb.nn.Linear8bitLt):
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=first.state.threshold, llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=first.weight.quant_type,
        bnb_4bit_compute_dtype=first.compute_dtype,
        bnb_4bit_use_double_quant=first.weight.compress_statistics,
        llm_int8_skip_modules=skip,
    )


def bnb_layers(model: nn.Module) -> list[str]:
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def empty_linear(linear: nn.Linear, recipe: Recipe) -> nn.Module:
    """The bnb module for `linear`, its weight still unset (on the meta device: nothing is allocated)."""
    import bitsandbytes as bnb
    import torch

    has_bias = linear.bias is not None
    if recipe.weights == "int8":
        return bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=float(recipe.option("threshold")),
            device="meta",
        )
    module = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=has_bias,
        compute_dtype=getattr(torch, COMPUTE_DTYPES[str(recipe.option("compute_dtype"))]),
        compress_statistics=bool(recipe.option("double_quant")),
        quant_type=recipe.weights,
        device="meta",
    )
    if recipe.option("compute_dtype") == "fp32":
        module.support_avx512bf16_for_cpu = False  # see the module docstring: that kernel is bf16-only
    return module


def quantized_linear(linear: nn.Linear, recipe: Recipe, device: str) -> nn.Module:
    """The bnb module holding `linear`'s weight quantized on `device` (bnb quantizes on `.to(device)`)."""
    import bitsandbytes as bnb

    module = empty_linear(linear, recipe)
    if recipe.weights == "int8":
        weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            blocksize=int(recipe.option("blocksize")),
            compress_statistics=bool(recipe.option("double_quant")),
            quant_type=recipe.weights,
            module=module,
        )
    module.weight = weight.to(device)
    module.bias = linear.bias
    return module


def restore_linear_(module: nn.Module, name: str, state: dict[str, torch.Tensor], device: str) -> None:
    """Install the saved quantized weight and bias of `name` into its empty bnb module, popping its keys."""
    import bitsandbytes as bnb
    from torch import nn

    prefix = f"{name}.weight"
    weight = state.pop(prefix)
    if isinstance(module, bnb.nn.Linear8bitLt):
        scale = state.pop(f"{name}.SCB")
        state.pop(f"{name}.weight_format", None)
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scale)
    else:
        stats = {key[len(prefix) + 1 :]: state.pop(key) for key in list(state) if key.startswith(prefix + ".")}
        module.weight = bnb.nn.Params4bit.from_prequantized(weight, stats, device=device, module=module)
    if f"{name}.bias" in state:
        module.bias = nn.Parameter(state.pop(f"{name}.bias"), requires_grad=False)


def kernel_4bit(model: nn.Module, device: str) -> str:
    """Which 4-bit matmul runs, for summary.json (the fused CPU kernel computes in bf16)."""
    import bitsandbytes as bnb

    module = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    if device.startswith("cpu") and module.support_avx512bf16_for_cpu:
        return "fused AVX512-BF16 CPU kernel (bf16 compute)"
    return f"dequantize + {str(module.compute_dtype).removeprefix('torch.')} matmul"
