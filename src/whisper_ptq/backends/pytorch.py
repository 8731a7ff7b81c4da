"""PyTorch's own eager-mode int8 quantization (`torch.ao.quantization`), the seed paper's fastest CPU row.

Dynamic: `quantize_dynamic` swaps every nn.Linear for a `DynamicQuantizedLinear` (int8 weights, activations
quantized per call, per-tensor asymmetric quint8 with reduce_range, i.e. 7 bits, as fbgemm/x86 require).
Static: each nn.Linear's input is observed (torch.ao HistogramObserver) while transcribing the calibration
audio, then the Linear becomes a `StaticInputLinear`: fixed per-tensor input scale, int8 weights and fp32
output, through fbgemm's `quantized::linear_with_input_q_dq_qweight_dq_output_fp32`. The textbook eager flow
(QuantWrapper + prepare + convert to `nnq.Linear`) also requantizes every Linear's *output* to quint8 with
one calibrated scale, and Whisper's Linear outputs (encoder fc1/fc2 reach ~600 against a bulk of ~1) do not
survive that: tiny.en gives 99% WER that way. Only the Linears are quantized: LayerNorm, softmax, GELU and the
attention matmuls have no int8 kernel here and stay fp32.

torch 2.13 deprecates `torch.ao.quantization` in favour of torchao but still ships and runs it; the warnings
are silenced around our calls only (see `_quiet_deprecation`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends.base import (
    Backend,
    BuildContext,
    Built,
    Param,
    head_info,
    keep_head_param,
    replace_linears_,
    targets,
)
from whisper_ptq.errors import UserError
from whisper_ptq.models.names import HEAD
from whisper_ptq.recipes import OptionValue, Recipe

if TYPE_CHECKING:
    import torch
    from torch import nn

    from whisper_ptq.engines.hf import HFTranscriber

CALIBRATION_BATCH = 8


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    # torch 2.13 warns on every torch.ao.quantization call and every quantized-tensor creation (hundreds of
    # lines per model); the API still works, and the deprecation is recorded once in the backend description.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        yield


def _dynamic_qconfig(granularity: str) -> torch.ao.quantization.QConfig:
    import torch

    if granularity == "per-channel":
        return torch.ao.quantization.per_channel_dynamic_qconfig
    return torch.ao.quantization.default_dynamic_qconfig


def quantize_dynamic_(model: nn.Module, recipe: Recipe) -> None:
    import torch

    qconfig = _dynamic_qconfig(recipe.granularity)
    spec = dict.fromkeys(targets(model, recipe), qconfig)
    with _quiet_deprecation():
        torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def observe_linears_(model: nn.Module, recipe: Recipe) -> None:
    from whisper_ptq.backends.layers import ObservedLinear

    replace_linears_(model, targets(model, recipe), ObservedLinear)


def convert_observed_(model: nn.Module, recipe: Recipe) -> None:

    from whisper_ptq.backends.layers import ObservedLinear, StaticInputLinear

    observed = {name for name, module in model.named_modules() if isinstance(module, ObservedLinear)}

    def convert(module: nn.Module) -> nn.Module:
        scale, zero_point = module.observer.calculate_qparams()
        return StaticInputLinear(module.linear, recipe.granularity, float(scale), int(zero_point))

    with _quiet_deprecation():
        replace_linears_(model, observed, convert)


def static_skeleton_(model: nn.Module, recipe: Recipe) -> None:
    """The module structure of a static model with placeholder scales, for `load_state_dict` to fill."""
    from whisper_ptq.backends.layers import StaticInputLinear

    names = targets(model, recipe)
    with _quiet_deprecation():
        replace_linears_(model, names, lambda linear: StaticInputLinear(linear, recipe.granularity))


def calibrate(transcriber: HFTranscriber, audios: list[Any]) -> None:
    """Run the observers over real generation: encoder and every decoder step see calibration data."""
    for start in range(0, len(audios), CALIBRATION_BATCH):
        transcriber.transcribe(audios[start : start + CALIBRATION_BATCH])


def count_quantized(model: nn.Module) -> int:
    import torch

    from whisper_ptq.backends.layers import StaticInputLinear

    kinds = (torch.ao.nn.quantized.dynamic.Linear, StaticInputLinear)
    return sum(isinstance(module, kinds) for module in model.modules())


class PyTorchBackend(Backend):
    library = "torch"
    description = "PyTorch eager int8 (torch.ao.quantization, deprecated in torch 2.13 but still shipped)"
    params = {
        "scheme": Param(str, "dynamic", ("dynamic", "static"), "activation scales per call or calibrated"),
        "granularity": Param(str, "per-tensor", ("per-tensor", "per-channel"), "weight scale granularity"),
        "weights": Param(str, "int8", ("int8",), "weight dtype"),
        "keep": keep_head_param(kept_by_default=False),
    }
    named = {
        "torch-int8-dynamic": (
            "quantize_dynamic({nn.Linear}, qint8): per-tensor weights, per-tensor asymmetric activations "
            "(the seed paper's CPU row)",
            {},
        ),
        "torch-int8-dynamic-per-channel": (
            "quantize_dynamic with per_channel_dynamic_qconfig: per-channel symmetric weights",
            {"granularity": "per-channel"},
        ),
        "torch-int8-static": (
            "static int8 Linears: histogram-calibrated per-tensor input scales (calibration audio), "
            "per-channel weights, fp32 outputs (fbgemm)",
            {"scheme": "static", "granularity": "per-channel"},
        ),
    }

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        scheme, granularity = str(values["scheme"]), str(values["granularity"])
        keep = (HEAD,) if values["keep"] else ()
        return Recipe(
            name=name,
            library=self.library,
            scheme=scheme,
            weights=str(values["weights"]),
            activations="uint8",
            granularity=granularity,
            symmetric=True,
            keep=keep,
            devices=("cpu",),
            options=(("activation_granularity", "per-tensor"), ("activation_symmetric", False)),
            description=description or f"torch int8 {scheme} {granularity}",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        import torch

        from whisper_ptq.engines.hf import HFTranscriber

        # Checked here rather than in `check`, which must not import torch (`list` answers in a second); every
        # x86 and ARM build of torch ships one.
        if not torch.backends.quantized.supported_engines:
            raise UserError("this torch build has no quantized engine (fbgemm/x86/onednn/qnnpack)")
        model = bundle.model.to(ctx.device).eval()
        transcriber = HFTranscriber(model, bundle.processor, device=ctx.device)
        info: dict[str, Any] = {}
        if recipe.scheme == "static":
            if ctx.calibration is None:
                raise UserError(f"recipe {recipe.name} needs calibration audio (--calibration)")
            audios = ctx.calibration()
            observe_linears_(model, recipe)
            calibrate(transcriber, audios)
            convert_observed_(model, recipe)
            info.update(calibration_utterances=len(audios), calibration=ctx.calibration_spec)
        else:
            quantize_dynamic_(model, recipe)
        return Built(transcriber, model, {**self._info(model, recipe), **info})

    def _info(self, model: nn.Module, recipe: Recipe) -> dict[str, Any]:
        import torch

        scheme = "dynamic, per call" if recipe.scheme == "dynamic" else "static, histogram-calibrated"
        return {
            "quantized_engine": torch.backends.quantized.engine,
            "quantized_linear": count_quantized(model),
            "weights": f"qint8 {recipe.granularity} symmetric",
            "activations": f"quint8 per-tensor asymmetric, reduce_range (7-bit), {scheme}",
            HEAD: head_info(recipe),
        }

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        # Rebuild the same module structure (packed-params modules) on the fresh fp32 model, then overwrite
        # weights, scales and zero points with the saved ones.
        import torch

        from whisper_ptq.engines.hf import HFTranscriber

        model = bundle.model.to(ctx.device).eval()
        if recipe.scheme == "static":
            static_skeleton_(model, recipe)
        else:
            quantize_dynamic_(model, recipe)
        state = torch.load(saved_dir / "model.pt", map_location=ctx.device, weights_only=True)
        with _quiet_deprecation():
            model.load_state_dict(state)
        transcriber = HFTranscriber(model, bundle.processor, device=ctx.device)
        return Built(transcriber, model, self._info(model, recipe))
