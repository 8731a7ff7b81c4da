"""The nn.Module layers that backends swap into a model, kept apart from the backend modules so that those
import no torch until a model is quantized (the registry, recipe checks and `list` stay fast)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ObservedLinear(nn.Module):
    """An nn.Linear that records the range of its input (calibration only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        # x86's default activation observer, with its reduce_range (0..127, 7 bits): fbgemm's u8s8 kernels
        # can saturate their int16 intermediate sums with full-range activations on CPUs without VNNI
        self.observer = torch.ao.quantization.HistogramObserver(dtype=torch.quint8, quant_min=0, quant_max=127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observer(x)
        return self.linear(x)


class StaticInputLinear(nn.Module):
    """int8 Linear with a calibrated per-tensor input scale and fp32 output (fbgemm kernel)."""

    def __init__(self, linear: nn.Linear, granularity: str, scale: float = 1.0, zero_point: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed_params = torch.ao.nn.quantized.modules.linear.LinearPackedParams()
        self._packed_params.set_weight_bias(quantize_weight(linear.weight, granularity), linear.bias)
        self.register_buffer("input_scale", torch.tensor(scale, dtype=torch.float64))
        self.register_buffer("input_zero_point", torch.tensor(zero_point, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_params._packed_params
        scale, zero_point = self.input_scale.item(), int(self.input_zero_point.item())
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, scale, zero_point, packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_scale={self.input_scale}"


def quantize_weight(weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """Symmetric qint8 weight, per output channel or per tensor (torch.ao's default weight observers)."""
    q = torch.ao.quantization
    per_channel = granularity == "per-channel"
    observer = (q.default_per_channel_weight_observer if per_channel else q.default_weight_observer)()
    observer(weight.detach())
    scale, zero_point = observer.calculate_qparams()
    if per_channel:
        return torch.quantize_per_channel(weight.detach(), scale, zero_point, 0, torch.qint8)
    return torch.quantize_per_tensor(weight.detach(), float(scale), int(zero_point), torch.qint8)


class HeadTiedEmbedding(nn.Module):
    """The token embedding read from the quantized LM head: row i of the head's weight is token i's vector,
    as in the tied fp32 model. `weight` is a non-persistent buffer, so `state_dict` (what `save` writes)
    holds the table once, inside the quantized head; `refresh` recomputes it once the head is final."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.register_buffer("weight", torch.empty(0), persistent=False)

    def refresh(self, head: nn.Module) -> None:
        table = head.dequantize().to(torch.float32)
        self.weight = table.reshape(self.num_embeddings, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight, self.padding_idx)
