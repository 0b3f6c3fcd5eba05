"""Hook specifications of blt-decode's plugin system (pluggy project name ``blt_decode``).

A plugin is any module or object with functions marked ``@blt_decode.hookimpl``; third-party plugins are
found through the ``blt_decode`` entry-point group. Built-in strategies and backends are registered
exactly the same way.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("blt_decode")
hookimpl = pluggy.HookimplMarker("blt_decode")


@hookspec
def register_strategies(register):
    """Register decoding strategies.

    Call ``register(strategy)`` once per strategy object. A strategy has ``name``, ``description``,
    ``aliases``, an attrs ``Options`` class, ``lookahead(options)`` and a ``decode(session, context,
    options)`` generator that yields the token ids it commits (see :mod:`blt_decode.protocol`).
    Registering a name or alias that another plugin already registered raises
    :class:`~blt_decode.errors.DuplicateNameError` naming both plugins.
    """


@hookspec
def register_backends(register):
    """Register compute backends.

    Call ``register(backend)`` once per backend object. A backend has ``name``, ``description`` and
    ``open_session(model, capacity)`` returning a :class:`~blt_decode.session.DecodeSession` whose
    primitives run the model its way (eager, compiled, static, ...), and optionally ``runner(model)``
    (a :class:`~blt_decode.runner.Runner`) for the batched engine. Strategies never see which backend
    runs them.
    Duplicate names raise :class:`~blt_decode.errors.DuplicateNameError` naming both plugins.
    """
