"""The plugin manager and the registries of strategies and backends built from it."""

from __future__ import annotations

import importlib
from typing import Any, Callable

import attrs
import pluggy

from blt_decode import hookspecs
from blt_decode.errors import (
    DuplicateNameError,
    UnknownBackendError,
    UnknownStrategyError,
)
from blt_decode.protocol import Backend, Strategy

ENTRY_POINT_GROUP = "blt_decode"

#: Built-in plugins, registered exactly like third-party ones.
DEFAULT_PLUGINS = (
    "blt_decode.strategies.autoregressive",
    "blt_decode.strategies.blt_s",
    "blt_decode.strategies.blt_d",
    "blt_decode.strategies.blt_dv",
    "blt_decode.backends.eager",
    "blt_decode.backends.compiled",
    "blt_decode.backends.static",
)

_pm: pluggy.PluginManager | None = None
_strategies: dict[str, Any] | None = None
_backends: dict[str, Any] | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("blt_decode")
        pm.add_hookspecs(hookspecs)
        for module_name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(module_name), name=module_name)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _pm = pm
    return _pm


def reset() -> None:
    """Forget every plugin and registry; the next lookup rebuilds them (re-reading entry points)."""
    global _pm, _strategies, _backends
    _pm = _strategies = _backends = None


def _collect(hook_name: str, kind: str, check: Callable[[Any], None]) -> dict[str, Any]:
    pm = get_plugin_manager()
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():

        def register(obj: Any, _plugin: str = impl.plugin_name) -> None:
            check(obj)
            for key in (obj.name, *getattr(obj, "aliases", ())):
                if key in owners:
                    raise DuplicateNameError(
                        f"{kind} name {key!r} is registered by both plugin {owners[key]!r} and plugin {_plugin!r}"
                    )
                owners[key] = _plugin
                found[key] = obj

        impl.function(register=register)
    return found


def _check_strategy(obj: Any) -> None:
    if not isinstance(obj, Strategy) or not attrs.has(obj.Options):
        raise TypeError(
            f"{obj!r} is not a strategy: it needs name, description, aliases, an attrs Options class, "
            "lookahead() and decode()"
        )


def _check_backend(obj: Any) -> None:
    if not isinstance(obj, Backend):
        raise TypeError(f"{obj!r} is not a backend: it needs name, description and open_session()")


def strategies() -> dict[str, Any]:
    """Every registered strategy by name *and* alias."""
    global _strategies
    if _strategies is None:
        _strategies = _collect("register_strategies", "strategy", _check_strategy)
    return _strategies


def backends() -> dict[str, Any]:
    global _backends
    if _backends is None:
        _backends = _collect("register_backends", "backend", _check_backend)
    return _backends


def strategy_names() -> list[str]:
    """Canonical names of the registered strategies (aliases left out)."""
    return sorted({s.name for s in strategies().values()})


def backend_names() -> list[str]:
    return sorted(backends())


def get_strategy(name: str) -> Any:
    try:
        return strategies()[name]
    except KeyError:
        raise UnknownStrategyError(name, sorted(strategies())) from None


def get_backend(name: str) -> Any:
    try:
        return backends()[name]
    except KeyError:
        raise UnknownBackendError(name, backend_names()) from None
