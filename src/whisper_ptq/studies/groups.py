"""Layer groups: the sets of Linear layers that sensitivity quantizes one at a time and the mixed-precision
search gives one format each. Coarse: encoder self-attention (q/k/v/out), encoder MLP (fc1/fc2), decoder
self-attention, decoder cross-attention (`encoder_attn`), decoder MLP, and the LM head. Fine: each layer index
of each of those components, and the head. Each level covers every Linear exactly once."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from whisper_ptq.errors import UserError
from whisper_ptq.models.names import HEAD
from whisper_ptq.recipes import Recipe

LEVELS = ("coarse", "fine", "both")
# component -> (stack, regex of its Linears inside one layer of that stack)
COMPONENTS: dict[str, tuple[str, str]] = {
    "encoder.attn": ("encoder", r"self_attn\.(q|k|v|out)_proj"),
    "encoder.mlp": ("encoder", r"fc[12]"),
    "decoder.self_attn": ("decoder", r"self_attn\.(q|k|v|out)_proj"),
    "decoder.cross_attn": ("decoder", r"encoder_attn\.(q|k|v|out)_proj"),
    "decoder.mlp": ("decoder", r"fc[12]"),
}


@dataclass(frozen=True)
class Group:
    """Linear layers quantized together: a component in every layer (coarse), in one layer (fine), or the head."""

    name: str  # "encoder.attn", "encoder.attn.3", "proj_out"
    component: str
    layer: int | None  # None: all layers of the component, or the head
    patterns: tuple[str, ...]  # regexes of module names, as in Recipe.modules

    @property
    def level(self) -> str:
        return "coarse" if self.layer is None else "fine"


HEAD_GROUP = Group(HEAD, HEAD, None, (rf"^{HEAD}$",))


def _component_group(component: str, layer: int | None) -> Group:
    stack, inner = COMPONENTS[component]
    index = r"\d+" if layer is None else str(layer)
    name = component if layer is None else f"{component}.{layer}"
    return Group(name, component, layer, (rf"^model\.{stack}\.layers\.{index}\.{inner}$",))


def groups(config: Any, level: str) -> list[Group]:
    """The groups of a level for a Whisper config (its layer counts); `both` lists coarse then fine, and the
    head, a single module, once."""
    if level not in LEVELS:
        raise UserError(f"level {level!r} is not one of {', '.join(LEVELS)}")
    layers = {"encoder": config.encoder_layers, "decoder": config.decoder_layers}
    coarse = [_component_group(c, None) for c in COMPONENTS]
    fine = [_component_group(c, i) for c, (stack, _) in COMPONENTS.items() for i in range(layers[stack])]
    chosen = {"coarse": coarse, "fine": fine, "both": coarse + fine}[level]
    return [*chosen, HEAD_GROUP]


def restrict(recipe: Recipe, group: Group) -> Recipe:
    """The recipe quantizing only the group's modules (its name says which, so each is its own task)."""
    return replace(recipe, name=f"{recipe.name}@{group.name}", modules=group.patterns)
