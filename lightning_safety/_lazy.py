"""Lazy package exports (PEP 562): a name is imported from its module the first time it is used.

``import lightning_safety.data.prompts`` runs ``lightning_safety/data/__init__.py`` first; with eager
re-exports there, reading a prompt file would import Lightning (through the datamodule), which
costs seconds (``lightning-safety score --help`` paid them). A package declares its exports as
``{module: names}`` and gets a module ``__getattr__`` and ``__dir__`` that import on demand::

    __getattr__, __dir__ = lazy_exports(__name__, {"lightning_safety.data.collate": ("ChatCollator",)})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package`` that import each export from its module.

    Args:
        package: the package's ``__name__``.
        exports: module name -> the names it provides to the package.

    Returns:
        ``(__getattr__, __dir__)``; an imported name is stored in the package, so the lookup runs once.
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__


def export_names(exports: Mapping[str, Iterable[str]]) -> list[str]:
    """Every exported name, sorted (a package's ``__all__``)."""
    return sorted(name for names in exports.values() for name in names)
