"""torchao's `quantize_` API: int8 dynamic, int8 weight-only and int4 weight-only nn.Linear layers.

Weights become torchao tensor subclasses inside the unchanged nn.Linear modules, so the model, its state
dict keys and `generate()` stay those of transformers. int4 uses the prototype `PrototypeInt4WeightOnlyConfig`
(Int4OpaqueTensor, ATen's `_weight_int4pack_mm_for_cpu`): in torchao 0.18 the stable `Int4WeightOnlyConfig`
has no CPU packing format (plain/preshuffled need the CUDA-only mslk package, plain_int32 is XPU/NPU only,
tile_packed_to_4d is CUDA tinygemm). That kernel is fast only with bf16 activations (fp32 input takes a
slow path, ~30x slower than fp32 nn.Linear at 1500 tokens), so int4 recipes run the whole model in bf16.

`save` writes what transformers' torchao integration saves (`TorchAoConfig` in config.json, tensor subclasses
flattened into model.safetensors by torchao's safetensors support) wherever torchao can flatten the weights'
subclass, so `WhisperForConditionalGeneration.from_pretrained` loads the export. torchao 0.18 cannot
flatten Int4OpaqueTensor (the CPU int4 layout): int4 models are saved with torch.save, for whisper-ptq's
loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends.base import (
    Backend,
    BuildContext,
    Built,
    Loader,
    Param,
    head_info,
    keep_head_param,
    save_transformers,
    targets,
    transformers_loader,
)
from whisper_ptq.errors import UserError
from whisper_ptq.models.names import HEAD
from whisper_ptq.recipes import OptionValue, Recipe

if TYPE_CHECKING:
    import torch
    from torch import nn

MODES = ("int8-dynamic", "int8-weight-only", "int4-weight-only")
INT4_GROUP_SIZES = (32, 64, 128)  # what Int4OpaqueTensor packs; all divide 384, the smallest Whisper width
DEFAULT_INT4_GROUP_SIZE = 128

# mode -> (scheme, weights, activations, weight granularity, compute dtype)
MODE_FIELDS = {
    "int8-dynamic": ("dynamic", "int8", "int8", "per-channel", "fp32"),
    "int8-weight-only": ("weight-only", "int8", None, "per-channel", "fp32"),
    "int4-weight-only": ("weight-only", "int4", None, "per-group", "bf16"),
}
COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # torch dtype names
# What runs in eager mode on CPU (recorded in summary.json): the int8 paths are written for torch.compile,
# which fuses them into oneDNN int8 GEMMs; eager they are slower than fp32.
KERNELS = {
    "int8-dynamic": "per-token symmetric int8 activations per call, torch._int_mm (eager)",
    "int8-weight-only": "int8 weight cast to the activation dtype, then fp32 mm (eager)",
    "int4-weight-only": "aten._weight_int4pack_mm_for_cpu, bf16 activations",
}


def torchao_config(recipe: Recipe) -> Any:
    return mode_config(str(recipe.option("mode")), recipe.group_size)


def mode_config(mode: str, group_size: int | None = None) -> Any:
    """The torchao config object for a mode. `set_inductor_config=False`: we run eager, and the default
    True rewrites global torch._inductor settings as a side effect of quantizing."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if mode == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if mode == "int8-weight-only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)


def transformers_serializable(model: nn.Module) -> bool:
    """Whether torchao's safetensors support (what transformers saves torchao models with) can flatten every
    quantized weight of the model."""
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES

    return set(quantized_weights(model).values()) <= set(ALLOWED_TENSORS_SUBCLASSES)


def compute_dtype(recipe: Recipe) -> torch.dtype:
    import torch

    return getattr(torch, COMPUTE_DTYPES[str(recipe.option("compute_dtype"))])


def quantize_linears_(model: nn.Module, recipe: Recipe) -> None:
    from torchao.quantization import quantize_

    names = targets(model, recipe)
    quantize_(model, torchao_config(recipe), filter_fn=lambda _module, fqn: fqn in names)


def quantized_weights(model: nn.Module) -> dict[str, str]:
    """Linear name -> torchao tensor subclass of its weight (layers torchao skipped are absent)."""
    from torch import nn
    from torchao.utils import TorchAOBaseTensor

    return {
        name: type(module.weight).__name__
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and isinstance(module.weight, TorchAOBaseTensor)
    }


def int8_mode(model: nn.Module) -> str:
    """The mode a model's Int8Tensor weights were made by: dynamic ones carry their activation settings."""
    from torchao.utils import TorchAOBaseTensor

    weight = next(m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), TorchAOBaseTensor))
    return "int8-weight-only" if getattr(weight, "act_quant_kwargs", None) is None else "int8-dynamic"


class TorchaoBackend(Backend):
    library = "torchao"
    description = "torchao quantize_: int8 dynamic / int8 weight-only / int4 weight-only tensor subclasses"
    requires = {"torchao": "torchao"}
    params = {
        "mode": Param(str, "int8-dynamic", MODES, "what is quantized: weights and activations, or weights"),
        "group_size": Param(int, None, INT4_GROUP_SIZES, f"int4 group size (default {DEFAULT_INT4_GROUP_SIZE})"),
        "keep": keep_head_param(kept_by_default=False),
    }
    named = {
        "torchao-int8-dynamic": (
            "Int8DynamicActivationInt8WeightConfig: per-channel symmetric int8 weights, per-token symmetric "
            "int8 activations",
            {"mode": "int8-dynamic"},
        ),
        "torchao-int8-weight-only": (
            "Int8WeightOnlyConfig: per-channel symmetric int8 weights, fp32 compute",
            {"mode": "int8-weight-only"},
        ),
        "torchao-int4-weight-only": (
            "PrototypeInt4WeightOnlyConfig(group_size=128): asymmetric int4 groups, ATen CPU int4 kernel",
            {"mode": "int4-weight-only", "group_size": "128"},
        ),
    }

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        mode = str(values["mode"])
        group_size = values["group_size"]
        if mode == "int4-weight-only":
            group_size = group_size or DEFAULT_INT4_GROUP_SIZE
        elif group_size is not None:
            raise UserError(f"recipe {name!r}: group_size applies to mode=int4-weight-only only, not {mode}")
        scheme, weights, activations, granularity, compute = MODE_FIELDS[mode]
        return Recipe(
            name=name,
            library=self.library,
            scheme=scheme,
            weights=weights,
            activations=activations,
            granularity=granularity,
            group_size=int(group_size) if group_size else None,
            # tinygemm-style int4 has a zero point per group; the int8 configs are symmetric
            symmetric=weights == "int8",
            # ATen's int4 CPU packing needs out_features % 16 == 0; Whisper's vocab (51864-51866) is not
            keep=(HEAD,) if values["keep"] or weights == "int4" else (),
            # int4 packs for ATen's CPU kernel only; the int8 subclasses run on CPU and CUDA
            devices=("cpu",) if weights == "int4" else ("cpu", "cuda"),
            options=(("compute_dtype", compute), ("mode", mode)),
            description=description or f"torchao {mode}",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        model = self._base_model(bundle, recipe, ctx)
        quantize_linears_(model, recipe)
        return self._quantized(model, bundle, recipe, ctx)

    def save(self, quantized: Built, out_dir: Path) -> None:
        model = quantized.model
        if not transformers_serializable(model):
            super().save(quantized, out_dir)
            return
        from torch import nn
        from transformers import TorchAoConfig
        from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

        quantized_names = quantized_weights(model)
        plain = [
            name for name, module in model.named_modules() if type(module) is nn.Linear and name not in quantized_names
        ]
        config = TorchAoConfig(mode_config(int8_mode(model)), modules_to_not_convert=plain)
        save_transformers(model, out_dir, config, TorchAoHfQuantizer(config))

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        import torch

        if (saved_dir / "model.safetensors").is_file():
            from transformers import WhisperForConditionalGeneration

            model = WhisperForConditionalGeneration.from_pretrained(saved_dir).to(ctx.device).eval()
            return self._quantized(model, bundle, recipe, ctx)
        # torch.save kept the quantized subclasses themselves; assign=True puts them in place of the
        # full-precision parameters (copying into those would dequantize them).
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        model = self._base_model(bundle, recipe, ctx)
        with torch.serialization.safe_globals([Int4OpaqueTensor]):  # the one layout saved this way
            state = torch.load(saved_dir / "model.pt", map_location=ctx.device, weights_only=True)
        model.load_state_dict(state, assign=True)
        return self._quantized(model, bundle, recipe, ctx)

    def loaders(self, recipe: Recipe, english_only: bool) -> list[Loader]:
        if recipe.weights == "int4":
            return super().loaders(recipe, english_only)
        load = "model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()"
        imports = ["from transformers import WhisperForConditionalGeneration"]
        note = "transformers rebuilds the torchao tensor subclasses from the `quantization_config` in config.json."
        return [transformers_loader("transformers", ("torchao",), imports, load, english_only, note)]

    @staticmethod
    def _base_model(bundle: Any, recipe: Recipe, ctx: BuildContext) -> nn.Module:
        return bundle.model.to(ctx.device, compute_dtype(recipe)).eval()

    def _quantized(self, model: nn.Module, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        from whisper_ptq.engines.hf import HFTranscriber

        weights = quantized_weights(model)
        info = {
            "config": type(torchao_config(recipe)).__name__,
            "kernel": KERNELS[str(recipe.option("mode"))],
            "compute_dtype": recipe.option("compute_dtype"),
            "tensor_subclass": sorted(set(weights.values())),
            "quantized_linear": len(weights),
            "proj_out": head_info(recipe),
        }
        transcriber = HFTranscriber(model, bundle.processor, device=ctx.device, input_dtype=compute_dtype(recipe))
        return Built(transcriber, model, info)
