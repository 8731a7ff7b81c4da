"""The `key=value,key=value` lists of recipe parameters and dataset modifiers, parsed one way."""

from __future__ import annotations

from whisper_ptq.errors import UserError


def parse_key_values(body: str, context: str) -> dict[str, str]:
    """`a=1, b=x` -> {"a": "1", "b": "x"} (spaces around items stripped); `context` starts each error message."""
    params: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise UserError(f"{context}: parameter {item!r} is not of the form key=value")
        if key in params:
            raise UserError(f"{context}: parameter {key!r} given twice")
        params[key] = value
    return params
