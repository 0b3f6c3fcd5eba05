"""The server on Ray Serve: ``blt-decode serve --ray [ADDRESS] --replicas N`` (see docs/serving.md)."""

from __future__ import annotations

from typing import Any

from ray import serve

from blt_decode.serving.app import DEFAULT_MAX_BODY_BYTES

#: requests a replica takes at once, per engine slot (the rest wait in Ray Serve's queue)
ONGOING_PER_SLOT = 4
#: the Ray Serve application's name
APP_NAME = "blt-decode"


@serve.ingress()
class BLTDecodeReplica:
    """One replica: a model, an engine, and the OpenAI-compatible app over them."""

    def __init__(self, model: str, backend: str = "eager", max_batch: int = 16, model_name: str | None = None,
                 api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, threads: int = 1,
                 dtype: str | None = None, device: str | None = None, chat_template: str | None = None,
                 chat_stops: tuple[str, ...] | None = None):
        import torch

        from blt_decode.serving.chat import PLAIN, ChatTemplate

        if threads:
            torch.set_num_threads(threads)
        # the template travels as text (a compiled one does not pickle) and is compiled on the replica
        chat = ChatTemplate(chat_template if chat_template is not None else PLAIN.source,
                            tuple(chat_stops) if chat_stops is not None else PLAIN.stops)
        self.settings = dict(model=model, backend=backend, max_batch=max_batch, model_name=model_name,
                             api_key=api_key, max_body_bytes=max_body_bytes,
                             dtype=getattr(torch, dtype) if dtype else None, device=device, chat_template=chat)

    def __serve_build_asgi_app__(self) -> Any:
        from blt_decode.plugins import registry as plugins
        from blt_decode.serving.app import build_app

        app = build_app(**self.settings)
        # compile before taking requests, as the local server does: no request waits on a compilation
        plugins.warm_up(plugins.get_backend(self.settings["backend"]), app.state.engine.model,
                        rows=(self.settings["max_batch"],))
        return app


def application(model: str, *, replicas: int = 1, max_batch: int = 16, num_cpus: float = 1.0,
                **settings: Any) -> Any:
    """The bound Ray Serve application (``serve.run`` it): ``replicas`` replicas of
    :class:`BLTDecodeReplica`, each reserving ``num_cpus`` CPUs."""
    deployment = serve.deployment(
        BLTDecodeReplica, name="BLTDecode", num_replicas=replicas,
        max_ongoing_requests=ONGOING_PER_SLOT * max_batch, ray_actor_options={"num_cpus": num_cpus},
        health_check_period_s=2, graceful_shutdown_timeout_s=5,
    )
    return deployment.bind(model, max_batch=max_batch, **settings)


def run(model: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, blocking: bool = True,
        **settings: Any) -> None:
    """Start Ray Serve's proxy on ``host:port`` and deploy the app (in the Ray session already initialised
    by the caller, see :func:`blt_decode.serving.ray_data.connect`); with ``blocking``, until interrupted."""
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application(model, replicas=replicas, **settings), name=APP_NAME, route_prefix="/",
                  blocking=blocking)
    except KeyboardInterrupt:  # Ctrl-C while blocking: a normal end
        pass
    finally:
        if blocking:
            serve.shutdown()
