"""Serving and scale-out: an OpenAI-compatible HTTP server over one :class:`~blt_decode.engine.core.Engine`,
its Ray Serve deployment, and batch generation on Ray Data. See docs/serving.md.

Each module is imported only when used, so a plain install without the ``serve``/``ray`` extras works."""

from __future__ import annotations

import importlib
import os

from blt_decode.errors import MissingExtraError, install_hint

#: the packages each extra brings, by import name
EXTRAS = {
    "serve": ("fastapi", "uvicorn", "prometheus_client", "httpx"),
    "ray": ("ray", "ray.serve", "ray.data"),
}


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` (one line naming the pip command) unless ``extra``'s packages import."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtraError(
                f"{what} needs the '{extra}' extra ({exc.name or module} is not installed): {install_hint(extra)}"
            ) from None



def local_ray_environment() -> None:
    """Settings for a Ray cluster of this machine only; they must be set before Ray is imported. Ray then
    listens on loopback alone (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's switch for a one-machine
    cluster: its node address becomes 127.0.0.1 instead of the machine's network address) and sends no
    usage statistics out. Values already in the environment win."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
