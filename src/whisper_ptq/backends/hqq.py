"""HQQ (half-quadratic quantization): 8/4/3/2-bit affine weights per group, zero points fitted by HQQ's
proximal solver, no calibration data.

Each selected nn.Linear is replaced, one at a time, by an `HQQLinear` built from `BaseQuantizeConfig`
(HQQ's default settings: zero and scale per group along `axis`, optimized, zero rounded at 4 bits, 3-bit
packed 10 values per int32). On CPU the layer computes in fp32 with HQQ's pure-PyTorch backend
(`HQQBackend.PYTORCH`: unpack, dequantize, matmul at every call); the ATen backend needs HQQ's CUDA
extension. The weights are stored as packed integers plus fp32 scales/zeros, which is what `save` writes.

hqq's model-level helpers do not fit Whisper: `AutoHQQHFModel.from_quantized` rebuilds an `AutoModel`
(`WhisperModel`, no LM head) and its `save_quantized` writes the tied embedding/head weight twice. So
`save` writes the model's state dict, in which each HQQLinear serializes itself (`HQQLinear.state_dict`:
packed weights, scales, zeros and its quantization settings), and `load` swaps empty HQQLinears in where
the saved state has quantized weights and lets `HQQLinear.load_state_dict` restore them. transformers 5 cannot
load HQQ models either (its HQQ quantizer raises NotImplementedError on load), so an export's loader does
what `load` does, with HQQ's and torch's public calls.
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
    head_kept,
    keep_head_param,
    replace_linears_,
    target_linears,
    transformers_loader,
)
from whisper_ptq.errors import UserError
from whisper_ptq.models.names import HEAD
from whisper_ptq.recipes import OptionValue, Recipe

if TYPE_CHECKING:
    from torch import nn

NBITS = (8, 4, 3, 2)
GROUP_SIZES = (32, 64, 128)  # each divides 384, the smallest Whisper width, as HQQ requires
KERNEL = "PYTORCH"  # HQQBackend member: the one that runs on CPU
STATE_FILE = "model.pt"


def quant_config(recipe: Recipe) -> dict[str, Any]:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(
        nbits=int(recipe.weights.removeprefix("int")), group_size=recipe.group_size, axis=recipe.option("axis")
    )


def hqq_linear(linear: nn.Module | None, config: dict[str, Any] | None, device: str) -> nn.Module:
    """An HQQLinear quantizing `linear` with `config` (or an empty one to load a state dict into)."""
    import torch
    from hqq.core.quantize import HQQBackend as Kernel
    from hqq.core.quantize import HQQLinear

    # A class-wide setting in hqq; PYTORCH is also its default, set here so the recorded kernel is certain.
    HQQLinear.set_backend(getattr(Kernel, KERNEL))
    return HQQLinear(linear, config, compute_dtype=torch.float32, device=device, initialize=linear is not None)


def hqq_layers(model: nn.Module) -> list[str]:
    from hqq.core.quantize import HQQLinear

    return [name for name, module in model.named_modules() if isinstance(module, HQQLinear)]


class HQQBackend(Backend):
    library = "hqq"
    description = "HQQ half-quadratic weight quantization (HQQLinear), 8/4/3/2-bit groups, no calibration"
    requires = {"hqq": "hqq"}
    params = {
        "nbits": Param(int, 4, NBITS, "weight bits"),
        "group_size": Param(int, 64, GROUP_SIZES, "weights sharing one scale and zero point"),
        "axis": Param(int, 1, (0, 1), "grouping axis: 1 groups along input features (hqq's default)"),
        "keep": keep_head_param(kept_by_default=True),
    }
    named = {
        "hqq-int8": ("HQQLinear nbits=8, group_size=64 (weight-only)", {"nbits": "8"}),
        "hqq-int4": (
            "HQQLinear nbits=4, group_size=64: affine 4-bit weights, float activations; weight-only, "
            "though the seed paper labels this row 'HQQ int4 (dyn.)'",
            {"nbits": "4"},
        ),
        "hqq-int3": (
            "HQQLinear nbits=3, group_size=64; weight-only, though the seed paper labels this row 'HQQ int3 (dyn.)'",
            {"nbits": "3"},
        ),
        "hqq-int2": (
            "HQQLinear nbits=2, group_size=32: the smallest group offered, since 2-bit needs the most scales",
            {"nbits": "2", "group_size": "32"},
        ),
    }

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        nbits, group_size = int(values["nbits"]), int(values["group_size"])
        return Recipe(
            name=name,
            library=self.library,
            scheme="weight-only",
            weights=f"int{nbits}",
            granularity="per-group",
            group_size=group_size,
            symmetric=False,
            keep=(HEAD,) if values["keep"] else (),
            devices=("cpu", "cuda"),
            options=(("axis", int(values["axis"])), ("compute_dtype", "fp32"), ("kernel", KERNEL)),
            description=description or f"HQQ {nbits}-bit, groups of {group_size}",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        model = bundle.model.to(ctx.device).eval()
        config = quant_config(recipe)
        replace_linears_(
            model, target_linears(model, recipe, lm_head=True), lambda linear: hqq_linear(linear, config, ctx.device)
        )
        return self._quantized(model, bundle, recipe, ctx)

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        import torch

        path = saved_dir / STATE_FILE
        if not path.is_file():
            raise UserError(f"{saved_dir} holds no HQQ model ({STATE_FILE} is missing)")
        state = torch.load(path, map_location=ctx.device, weights_only=True)
        model = bundle.model.to(ctx.device).eval()
        # The saved state says which layers are quantized: those with packed weights.
        names = [key.removesuffix(".W_q") for key in state if key.endswith(".W_q")]
        replace_linears_(model, names, lambda _linear: hqq_linear(None, None, ctx.device))
        model.load_state_dict(state)
        return self._quantized(model, bundle, recipe, ctx)

    def loaders(self, recipe: Recipe, english_only: bool) -> list[Loader]:
        imports = [
            "from hqq.core.quantize import HQQLinear",
            "from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration",
        ]
        load = f"""\
model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(model_dir))
state = torch.load(f"{{model_dir}}/{STATE_FILE}", weights_only=True)
for name in {{key.removesuffix(".W_q") for key in state if key.endswith(".W_q")}}:  # HQQ's packed weights
    empty = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)
    model.set_submodule(name, empty)  # load_state_dict restores its weights and settings
model.load_state_dict(state)
model.generation_config = GenerationConfig.from_pretrained(model_dir)
model.eval()"""
        note = (
            "transformers 5 cannot load HQQ models (its HQQ quantizer raises NotImplementedError) and hqq's "
            "`AutoHQQHFModel.from_quantized` rebuilds a Whisper without its LM head, so the HQQLinear layers "
            "are put in place by hand, as whisper-ptq does."
        )
        return [transformers_loader("hqq", ("hqq",), imports, load, english_only, note)]

    @staticmethod
    def _quantized(model: nn.Module, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        import hqq

        from whisper_ptq.engines.hf import HFTranscriber

        info = {
            "hqq": hqq.__version__,
            "hqq_linear": len(hqq_layers(model)),
            "kernel": f"HQQBackend.{KERNEL}",
            "compute_dtype": "fp32",
            "kept_full_precision": [HEAD] if head_kept(recipe) else [],
        }
        return Built(HFTranscriber(model, bundle.processor, device=ctx.device), model, info)
