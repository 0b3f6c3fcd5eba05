"""The eager backend: plain PyTorch module calls, any device and dtype."""

from __future__ import annotations

from blt_decode.hookspecs import hookimpl
from blt_decode.model import BLTModel
from blt_decode.session import DecodeSession, StackRunners


class EagerBackend:
    name = "eager"
    description = "plain PyTorch (any device, any dtype); the reference for every other backend"

    def runners(self, model: BLTModel) -> StackRunners:
        """The model's own modules (the batched engine runs them over many sequences at once)."""
        return StackRunners.eager(model)

    def open_session(self, model: BLTModel, capacity: int) -> DecodeSession:
        return DecodeSession(model, capacity, runners=self.runners(model))


@hookimpl
def register_backends(register):
    register(EagerBackend())
