"""The plugin manager and the registries of strategies and backends built from it."""

from __future__ import annotations

import importlib
import time
from typing import Any, Callable

import attrs
import pluggy

from blt_decode.plugins import hookspecs
from blt_decode.errors import (
    ContractError,
    DuplicateNameError,
    PluginError,
    UnknownBackendError,
    UnknownStrategyError,
)
from blt_decode.decoding.protocol import Backend, Strategy

ENTRY_POINT_GROUP = "blt_decode"

#: Built-in plugins, registered exactly like third-party ones.
DEFAULT_PLUGINS = (
    "blt_decode.strategies.autoregressive",
    "blt_decode.strategies.blt_s",
    "blt_decode.strategies.blt_d",
    "blt_decode.strategies.blt_dv",
    "blt_decode.backends.eager",
    "blt_decode.backends.compiled",
)

_pm: pluggy.PluginManager | None = None
_strategies: dict[str, Any] | None = None
_backends: dict[str, Any] | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager, built on first use: the built-in plugins, then the ``blt_decode`` entry points; a
    hook implementation no hookspec declares raises :class:`~blt_decode.errors.PluginError`."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("blt_decode")
        pm.add_hookspecs(hookspecs)
        for module_name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(module_name), name=module_name)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _check_pending(pm)
        _pm = pm
    return _pm


def _check_pending(pm: pluggy.PluginManager) -> None:
    """Refuse hook implementations no hookspec declares (pluggy's ``check_pending``, said as one line
    naming the plugin, the hook and the hooks that exist)."""
    known = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "blt_decode_spec"))
    for name, caller in sorted(vars(pm.hook).items()):
        if isinstance(caller, pluggy.HookCaller) and not caller.has_spec():
            plugins = ", ".join(repr(pm.get_name(impl.plugin)) for impl in caller.get_hookimpls())
            raise PluginError(f"plugin {plugins} implements hook {name!r}, which blt-decode does not declare; "
                              f"the hooks are: {', '.join(known)} (docs/plugins.md)")


def reset() -> None:
    """Forget every plugin and registry; the next lookup rebuilds them (re-reading entry points)."""
    global _pm, _strategies, _backends
    _pm = _strategies = _backends = None


def refresh() -> None:
    """Forget the registries but keep the plugins: the next lookup collects them again (after a plugin was
    registered or unregistered on the plugin manager)."""
    global _strategies, _backends
    _strategies = _backends = None


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


def _contract(protocol: type) -> tuple[list[str], list[str]]:
    """The attributes and the methods a protocol class of :mod:`blt_decode.decoding.protocol` declares: what the
    registry checks is read from the one statement of the contract, not restated here."""
    methods = [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    return list(protocol.__annotations__), methods


def _problems(obj: Any, protocol: type) -> list[str]:
    attributes, methods = _contract(protocol)
    missing = [m for m in attributes + methods if not hasattr(obj, m)]
    problems = [f"it has no {', '.join(missing)}"] if missing else []
    return problems + [f"{m} is not callable" for m in methods if hasattr(obj, m) and not callable(getattr(obj, m))]


def _refusal(obj: Any, protocol: type, problems: list[str]) -> ContractError:
    kind = protocol.__name__.lower()
    hint = (" (blt_decode.strategy.BaseStrategy supplies aliases, Options, lookahead, and description from the "
            "class docstring)") if protocol is Strategy else ""
    return ContractError(f"{obj!r} is not a {kind}: {'; '.join(problems)}. The contract: "
                         f"blt_decode.decoding.protocol.{protocol.__name__}, docs/plugins.md{hint}")


def _check_strategy(obj: Any) -> None:
    problems = _problems(obj, Strategy)
    if not problems and not (isinstance(obj.Options, type) and attrs.has(obj.Options)):
        problems.append(f"Options must be an attrs class, got {obj.Options!r}")
    if not problems and not (isinstance(obj.aliases, (tuple, list)) and all(isinstance(a, str) for a in obj.aliases)):
        problems.append(f"aliases must be a tuple of names, got {obj.aliases!r}")
    if problems:
        raise _refusal(obj, Strategy, problems)


def _check_backend(obj: Any) -> None:
    problems = _problems(obj, Backend)
    if not problems and getattr(obj, "warmup", None) is not None and not callable(obj.warmup):
        problems.append("warmup is not callable")
    if problems:
        raise _refusal(obj, Backend, problems)


def prepares(backend: Any) -> bool:
    """Whether ``backend`` has a warm-up (compiles ahead of the first request): its first runs are not
    representative of its speed."""
    return getattr(backend, "warmup", None) is not None


def warm_up(backend: Any, model: Any, *, rows: tuple[int, ...] = (1,), progress: bool = False) -> float | None:
    """Let ``backend`` prepare ``model`` for batches of up to ``max(rows)`` sequences (lone ones too if 1
    is in ``rows``) before timing or serving starts, with a progress bar on stderr if ``progress``.
    Returns the seconds it took, timed here (whatever ``warmup`` returns is ignored), or None for a backend
    with nothing to prepare (the optional ``warmup`` of the contract,
    :class:`~blt_decode.decoding.protocol.Backend`)."""
    if not prepares(backend):
        return None
    start = time.perf_counter()
    backend.warmup(model, rows=tuple(rows), progress=progress)
    return time.perf_counter() - start


def strategies() -> dict[str, Any]:
    """Every registered strategy by name *and* alias."""
    global _strategies
    if _strategies is None:
        _strategies = _collect("register_strategies", "strategy", _check_strategy)
    return _strategies


def backends() -> dict[str, Any]:
    """Every registered backend by name *and* alias."""
    global _backends
    if _backends is None:
        _backends = _collect("register_backends", "backend", _check_backend)
    return _backends


def strategy_names() -> list[str]:
    """Canonical names of the registered strategies (aliases left out)."""
    return sorted({s.name for s in strategies().values()})


def backend_names() -> list[str]:
    """Canonical names of the registered backends (aliases left out)."""
    return sorted({b.name for b in backends().values()})


def get_strategy(name: str) -> Any:
    """The strategy registered under ``name`` or alias; :class:`~blt_decode.errors.UnknownStrategyError` (naming the
    registered ones) otherwise."""
    try:
        return strategies()[name]
    except KeyError:
        raise UnknownStrategyError(name, sorted(strategies())) from None


def get_backend(name: str) -> Any:
    """The backend registered under ``name`` or alias; :class:`~blt_decode.errors.UnknownBackendError` (naming the
    registered ones) otherwise."""
    try:
        return backends()[name]
    except KeyError:
        raise UnknownBackendError(name, sorted(backends())) from None
