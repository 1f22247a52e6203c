"""ASE calculator plugin: ``mmea`` -> :class:`mmea_calc.MMEACalculator`.

Registered under the entry-point group ``ase.plugins`` (setup.cfg), which ASE's experimental
plugin system (``ase._4.plugins``, ASE >= 3.29) reads. Importing this module is cheap: it does
not import torch, mace, the calculator or even ASE (ASE resolves ``implementation`` only when
asked).
Where ASE lacks the plugin API, ``__ase_plugins__`` is an empty set.

Example:
    >>> from mmea_calc.ase_plugin import __ase_plugins__
    >>> sorted(plugin.name for plugin in __ase_plugins__)
    ['mmea']
"""

from __future__ import annotations

from typing import Any

__all__ = ["__ase_plugins__"]  # noqa: F822  (computed by the module __getattr__)

_PLUGINS: set[Any] | None = None


def _plugins() -> set[Any]:
    global _PLUGINS
    if _PLUGINS is None:
        try:  # experimental ASE API: absent before ASE 3.29, may move
            from ase._4.plugins.plugin import CalculatorPlugin
        except ImportError:
            CalculatorPlugin = None
        # importing ase._4.plugins loads every entry point, this module included, which may
        # have filled the cache already: keep one plugin object
        if _PLUGINS is None:
            _PLUGINS = set()
            if CalculatorPlugin is not None:
                _PLUGINS.add(
                    CalculatorPlugin(
                        "mmea",
                        implementation="mmea_calc.MMEACalculator",
                        citation="MMEA adapters: arXiv 2511.06696; MACE: arXiv 2206.07697",
                    )
                )
    return _PLUGINS


def __getattr__(name: str) -> Any:
    # computed on first access, not at import: ASE imports this module while it is itself
    # importing ase._4.plugins, so a module-level import of the plugin API would see a
    # half-initialised module (and ASE would record an empty plugin set)
    if name == "__ase_plugins__":
        return _plugins()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
