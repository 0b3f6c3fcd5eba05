"""Hook specifications of blt-decode's plugin system (pluggy project name ``blt_decode``).

A plugin is any module or object with functions marked ``@hookimpl`` (also importable as
``blt_decode.hookimpl`` and ``blt_decode.strategy.hookimpl``); third-party plugins are found through the
``blt_decode`` entry-point group. The built-in strategies and backends register the same way.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("blt_decode")
hookimpl = pluggy.HookimplMarker("blt_decode")


@hookspec
def register_strategies(register):
    """Register decoding strategies.

    Call ``register(strategy)`` once per strategy object: an object satisfying
    :class:`blt_decode.decoding.protocol.Strategy` (the contract; :class:`blt_decode.strategy.BaseStrategy` gives
    the defaults). One that does not is refused with a ``TypeError`` naming what it lacks; a name or
    alias that another plugin already registered raises :class:`~blt_decode.errors.DuplicateNameError`
    naming both plugins.
    """


@hookspec
def register_backends(register):
    """Register compute backends.

    Call ``register(backend)`` once per backend object: an object satisfying
    :class:`blt_decode.decoding.protocol.Backend` (the contract), whose sessions run the model its way (eager,
    compiled, ...), optionally with ``runner(model)`` for the batched engine and ``aliases`` (other names
    it answers to). Duplicate names raise :class:`~blt_decode.errors.DuplicateNameError` naming both
    plugins.
    """
