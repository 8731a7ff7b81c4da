"""Mixed precision: a plan of (module regexes, sub-recipe) entries applied in order to one model.

Each entry is delegated to its sub-recipe's own backend, restricted to the entry's modules with
`dataclasses.replace(sub, modules=patterns)`, so every layer is quantized exactly as its library quantizes
it; modules that no entry selects stay fp32. `whisper-ptq search` writes such recipes as JSON files
(`recipes.save_recipe_file`), which `eval`, `bench` and `export` accept like any recipe file.

The plan travels as a JSON string in the recipe's `plan` option: Recipe options are scalars, and keeping the
whole plan inside the one Recipe object means the results database, sweep workers and exports carry it as
they carry any recipe, with no schema change.

The tied token embedding. Whisper's LM head `proj_out` shares its weight with the token embedding (36% of
whisper-base). A library that quantizes the head unties the two, and the fp32 embedding is then saved beside
the quantized head: quantizing the head makes the saved model bigger. When a plan quantizes the head with a
library whose layers can give their weight back (`HEAD_TIE_LIBRARIES`), this backend re-ties them: the
embedding becomes a lookup into the quantized head's dequantized weight, so the one table is stored once,
quantized (as llama.cpp stores tied embeddings). The dequantized table lives in memory only, computed once
after quantizing or loading; the WER measured and the bytes saved both reflect the quantized table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends.base import Backend, BuildContext, Built, decided_fields, target_linears
from whisper_ptq.errors import UserError
from whisper_ptq.models.names import HEAD
from whisper_ptq.recipes import OptionValue, Recipe

if TYPE_CHECKING:
    from torch import nn

# Libraries whose quantized head module has `dequantize()` returning its (out, in) weight: HQQLinear does.
HEAD_TIE_LIBRARIES = ("hqq",)
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class PlanEntry:
    """Quantize the modules matching `modules` with `recipe`; `group` names them for people."""

    group: str
    modules: tuple[str, ...]
    recipe: Recipe

    def restricted(self) -> Recipe:
        return replace(self.recipe, modules=self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "modules": list(self.modules), "recipe": self.recipe.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanEntry:
        return cls(str(data["group"]), tuple(data["modules"]), Recipe.from_dict(data["recipe"]))


def mixed_recipe(name: str, plan: list[PlanEntry], description: str = "") -> Recipe:
    """A recipe applying `plan`; refused when an entry could not be restricted to its modules."""
    if not plan:
        raise UserError(f"mixed recipe {name!r}: the plan is empty (an all-fp32 model is the fp32 recipe)")
    for entry in plan:
        _check_entry(name, entry)
    subs = [entry.recipe for entry in plan]
    # The strongest requirement of any entry: a static entry needs calibration audio for the whole recipe.
    scheme = next((s for s in ("static", "dynamic") if any(r.scheme == s for r in subs)), "weight-only")
    return Recipe(
        name=name,
        library=MixedBackend.library,
        scheme=scheme,
        weights="mixed",
        granularity="mixed",
        symmetric=all(r.symmetric for r in subs),
        devices=tuple(d for d in DEVICES if all(d in r.devices for r in subs)),
        options=(("plan", json.dumps([entry.to_dict() for entry in plan])),),
        description=description or "; ".join(f"{e.group}: {e.recipe.name}" for e in plan),
    )


def _check_entry(name: str, entry: PlanEntry) -> None:
    sub = entry.recipe
    if not entry.modules:
        raise UserError(f"mixed recipe {name!r}: entry {entry.group!r} selects no modules")
    if sub.scheme == "reference" or sub.library == MixedBackend.library:
        # fp32 is expressed by leaving modules out of the plan; the reference backend converts whole models.
        raise UserError(f"mixed recipe {name!r}: entry {entry.group!r} uses {sub.name!r}, which is not a quantizer")
    if sub.modules:
        raise UserError(f"mixed recipe {name!r}: sub-recipe {sub.name!r} already restricts its modules")


def plan_of(recipe: Recipe) -> list[PlanEntry]:
    text = recipe.option("plan")
    try:
        return [PlanEntry.from_dict(item) for item in json.loads(str(text))]
    except (TypeError, KeyError, ValueError) as exc:
        raise UserError(f"mixed recipe {recipe.name!r} has no valid plan: {exc}") from None


def quantized_linears(model: nn.Module, names: list[str]) -> set[str]:
    """Those of `names` whose module is no longer a plain nn.Linear (the exact type: bitsandbytes' and
    Quanto's quantized layers subclass nn.Linear)."""
    from torch import nn

    modules = dict(model.named_modules())
    return {name for name in names if type(modules[name]) is not nn.Linear}


# Selects every module: for listing all Linears a recipe could quantize, with the same rules as the backends.
_EVERY_MODULE = Recipe(name="every module", library="none", scheme="weight-only", weights="any")


def all_linears(model: nn.Module) -> list[str]:
    """Every nn.Linear a recipe may select (call it before quantizing), the tied head included."""
    return target_linears(model, _EVERY_MODULE, lm_head=True)


class MixedBackend(Backend):
    library = "mixed"
    description = "mixed precision: per-module-group sub-recipes from a plan file written by `whisper-ptq search`"

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        raise UserError(f"recipe {name!r}: a mixed recipe is a plan file (.json) written by `whisper-ptq search`")

    def validate(self, recipe: Recipe, where: str) -> None:
        """A plan file: each entry's recipe checked by its own backend, then the whole rebuilt from the plan."""
        from whisper_ptq.backends import recipe_from_dict  # the registry imports this module

        plan = plan_of(recipe)
        for entry in plan:
            recipe_from_dict(entry.recipe.to_dict(), f"{where}: plan entry {entry.group!r}")
        wanted, rebuilt = decided_fields(recipe), decided_fields(mixed_recipe(recipe.name, plan, recipe.description))
        if wanted != rebuilt:
            key = next(k for k in wanted if wanted[k] != rebuilt[k])
            raise UserError(f"{where}: {key} {json.dumps(wanted[key])} does not follow from its plan")

    def check(self, recipe: Recipe, device: str) -> str | None:
        for entry in plan_of(recipe):
            reason = _backend(entry.recipe).check(entry.restricted(), device)
            if reason:
                return f"{entry.group} ({entry.recipe.name}): {reason}"
        return super().check(recipe, device)

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        plan = plan_of(recipe)
        model = bundle.model
        linears = all_linears(model)
        selected = _selections(model, plan)
        done: set[str] = set()
        steps = []
        for entry, names in zip(plan, selected, strict=True):
            quantized = _backend(entry.recipe).quantize(bundle, entry.restricted(), ctx)
            done |= names
            _check_in_place(model, quantized, entry, quantized_linears(model, linears) - done)
            steps.append({"group": entry.group, "recipe": entry.recipe.name, "modules": len(names), **quantized.info})
        tied = _tie_head_(model, plan, selected)
        return self._quantized(model, bundle, ctx, tied, {"plan": steps, "libraries": _libraries(plan)})

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        """One library's load restores every layer it saved (HQQ layers carry their own settings), so a plan
        that mixes libraries cannot be reloaded; its entries are loaded as one recipe over their union."""
        plan = plan_of(recipe)
        libraries = _libraries(plan)
        if len(libraries) > 1:
            raise UserError(f"mixed recipe {recipe.name!r} mixes {', '.join(libraries)}: it cannot be reloaded")
        model = bundle.model.to(ctx.device)
        # A head-tied model saved no embedding, so the tied module must be in place before the state loads.
        tied = _tie_head_(model, plan, _selections(model, plan))
        union = replace(plan[0].recipe, modules=tuple(p for entry in plan for p in entry.modules))
        loaded = _backend(union).load(bundle, union, saved_dir, ctx)
        return self._quantized(loaded.model, bundle, ctx, tied, {**loaded.info, "libraries": libraries})

    def save(self, quantized: Built, out_dir: Path) -> None:
        """A one-library plan is saved by that library, in the form its `load` reads back."""
        from whisper_ptq.backends import BACKENDS  # the registry imports this module

        libraries = quantized.info["libraries"]
        if len(libraries) == 1:
            BACKENDS[libraries[0]].save(quantized, out_dir)
        else:
            super().save(quantized, out_dir)

    @staticmethod
    def _quantized(model: nn.Module, bundle: Any, ctx: BuildContext, tied: bool, info: dict[str, Any]) -> Built:
        from whisper_ptq.engines.hf import HFTranscriber

        if tied:  # the head's weights are final now
            model.get_input_embeddings().refresh(model.get_submodule(HEAD))
        info = {**info, "embedding": _embedding_info(tied)}
        # Every entry quantized the same model in place, so one transcriber over it serves the whole plan.
        return Built(HFTranscriber(model, bundle.processor, device=ctx.device), model, info)


def _backend(recipe: Recipe) -> Backend:
    from whisper_ptq.backends import backend_for  # the registry imports this module

    return backend_for(recipe)


def _libraries(plan: list[PlanEntry]) -> list[str]:
    return sorted({entry.recipe.library for entry in plan})


def _selections(model: nn.Module, plan: list[PlanEntry]) -> list[set[str]]:
    """The Linear names each entry selects; refused when two entries select the same module."""
    selected = [set(target_linears(model, entry.restricted(), lm_head=True)) for entry in plan]
    for i, names in enumerate(selected):
        for j in range(i):
            both = sorted(names & selected[j])
            if both:
                raise UserError(f"plan entries {plan[j].group!r} and {plan[i].group!r} both select {both[0]}")
    return selected


def _check_in_place(model: nn.Module, quantized: Built, entry: PlanEntry, stray: set[str]) -> None:
    """A plan needs backends that quantize the given model in place and honour `Recipe.modules`."""
    if quantized.model is not model:
        raise UserError(f"{entry.recipe.library} does not quantize the model in place: it cannot join a mixed plan")
    if stray:
        raise UserError(f"{entry.recipe.name!r} for {entry.group!r} also quantized {min(stray)}: it ignores the plan")


def _tie_head_(model: nn.Module, plan: list[PlanEntry], selected: list[set[str]]) -> bool:
    """Swap in the head-tied embedding when the plan quantizes the head with a library that allows it."""
    from whisper_ptq.backends.layers import HeadTiedEmbedding

    entry = next((e for e, names in zip(plan, selected, strict=True) if HEAD in names), None)
    if entry is None or entry.recipe.library not in HEAD_TIE_LIBRARIES:
        return False
    model.set_input_embeddings(HeadTiedEmbedding(model.get_input_embeddings()))
    return True


def _embedding_info(tied: bool) -> str:
    if tied:
        return "tied to the quantized proj_out: stored once, quantized; dequantized in memory for lookups"
    return "fp32 nn.Embedding (stored once if proj_out is fp32 and tied, else beside the quantized head)"
