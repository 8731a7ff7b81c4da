"""Recipes: small immutable descriptions of one quantization configuration.

A recipe is named (`hqq-int4`) or parametric (`hqq:nbits=3,group_size=64`); both resolve to the same frozen
`Recipe`, built and validated by the library's backend (`backends.get_recipe`), so a misspelled parameter is
refused before any model is loaded. The named recipes live beside their backend (see `backends/`).
`Recipe.to_dict()` is the identity of stored runs: changing its output makes old results databases refuse
to resume.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from whisper_ptq.errors import UserError
from whisper_ptq.keyvalue import parse_key_values

SCHEMES = ("reference", "dynamic", "static", "weight-only")
GRANULARITIES = ("per-tensor", "per-channel", "per-group", "per-token", "mixed")

OptionValue = str | int | float | bool | None


@dataclass(frozen=True)
class Recipe:
    name: str
    library: str
    scheme: str
    weights: str
    activations: str | None = None
    granularity: str = "per-channel"
    group_size: int | None = None
    symmetric: bool = True
    keep: tuple[str, ...] = ()  # regexes of module names kept in full precision
    modules: tuple[str, ...] = ()  # regexes of module names to quantize; empty = every eligible module
    devices: tuple[str, ...] = ("cpu",)
    options: tuple[tuple[str, OptionValue], ...] = field(default=())
    description: str = ""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme {self.scheme!r} not in {SCHEMES}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} not in {GRANULARITIES}")

    @property
    def is_baseline(self) -> bool:
        return is_baseline({"library": self.library, "weights": self.weights})

    @property
    def needs_calibration(self) -> bool:
        return self.scheme == "static"

    def selects(self, module_name: str) -> bool:
        """Whether this recipe quantizes the module of that name (sensitivity runs and mixed precision
        restrict a recipe to some modules; `keep` always wins)."""
        if any(re.search(p, module_name) for p in self.keep):
            return False
        return not self.modules or any(re.search(p, module_name) for p in self.modules)

    def option(self, key: str, default: OptionValue = None) -> OptionValue:
        return dict(self.options).get(key, default)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["keep"] = list(self.keep)
        data["modules"] = list(self.modules)
        data["devices"] = list(self.devices)
        data["options"] = dict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        data = dict(data)
        data["keep"] = tuple(data.get("keep", ()))
        data["modules"] = tuple(data.get("modules", ()))
        data["devices"] = tuple(data.get("devices", ("cpu",)))
        data["options"] = tuple(sorted(dict(data.get("options", {})).items()))
        return cls(**data)


def is_baseline(recipe: dict[str, Any]) -> bool:
    """Whether a recipe (as `Recipe.to_dict` gives it) is the fp32 baseline every other recipe is compared
    with: transformers in fp32. Other unquantized recipes (ct2-float32, fast-cpu-fp32) are systems under test,
    not the reference."""
    return (recipe.get("library"), recipe.get("weights")) == ("reference", "fp32")


def parse_params(text: str) -> tuple[str, dict[str, str]]:
    """Split `lib:key=value,key=value` into the library and its raw parameters."""
    library, _, rest = text.partition(":")
    return library.strip(), parse_key_values(rest, f"recipe {text!r}")


def read_recipe_file(path: Path) -> dict[str, Any]:
    """A saved recipe's fields, unvalidated (`backends.get_recipe` checks them with the recipe's backend)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"recipe file {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"recipe file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe file {path} is not a recipe: expected a JSON object")
    return data


def save_recipe_file(recipe: Recipe, path: Path) -> None:
    path.write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
