"""The eager backend: plain PyTorch module calls, any device and dtype."""

from __future__ import annotations

from blt_decode.execution.runner import EagerRunner
from blt_decode.model.blt import BLTModel
from blt_decode.plugins.hookspecs import hookimpl


class EagerBackend:
    """The ``eager`` backend: the model's own modules, called as they are."""

    name = "eager"
    description = "plain PyTorch (any device, any dtype); the reference for every other backend"

    def runner(self, model: BLTModel) -> EagerRunner:
        """The reference runner over the model's own modules (any batch size)."""
        return EagerRunner(model)


@hookimpl
def register_backends(register):
    """Register the ``eager`` backend."""
    register(EagerBackend())
