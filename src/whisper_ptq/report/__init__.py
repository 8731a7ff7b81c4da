"""Reports: the bench report (`study`), built from `analysis` (systems, paired tests, guidance), `figures` and
`document` (blocks rendered to Markdown and HTML); `tables` writes every table of every output.

`write_report` and `analyse` are loaded on first use, so importing a light part (`tables`) costs nothing."""

from __future__ import annotations

from typing import Any

__all__ = ["analyse", "write_report"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from whisper_ptq.report import study

        return getattr(study, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
