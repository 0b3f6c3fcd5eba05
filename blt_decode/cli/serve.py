"""``blt-decode serve`` and ``serve-loadtest``: the OpenAI-compatible server (uvicorn or Ray Serve) and its
load test. The serve and ray extras are imported only when a command runs."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from blt_decode.checks import int_argument
from blt_decode.cli.common import (BACKEND_HELP, PROG, add_model_arguments, add_threads_argument, backend_for,
                                   compile_note, model_from_args, non_negative_int, slots)
from blt_decode.errors import CLIError
from blt_decode.plugins import registry as plugins
from blt_decode.serving import loadtest, local_ray_environment, require
from blt_decode.serving.connections import ConnectionLimits

#: the largest --max-body-bytes: a request body is held in memory whole
MAX_BODY_BYTES = 1 << 30


def _port(text: str) -> int:
    # not 0 ("any free port"): the server would listen on a port it never tells its clients
    value = non_negative_int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {value}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``blt-decode serve`` and ``blt-decode serve-loadtest``."""
    sv = sub.add_parser("serve", help="an OpenAI-compatible completions server over the batched engine",
                        description="POST /v1/completions (OpenAI-compatible, streaming), GET /v1/models, /health, "
                                    "/metrics; needs the serve extra: pip install -e \".[serve]\" (see docs/serving.md)")
    add_model_arguments(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=_port, default=8000, help="(default: %(default)s)")
    sv.add_argument("--backend", default="auto", help=BACKEND_HELP)
    sv.add_argument("--max-batch", type=slots, default=16,
                    help="requests decoded at once by the engine (continuous batching) (default: %(default)s)")
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: the --model spec)")
    sv.add_argument("--api-key", default=os.environ.get("BLT_DECODE_API_KEY") or None,
                    help="require 'Authorization: Bearer KEY' on every route but /health "
                         "(default: $BLT_DECODE_API_KEY; none: no authentication)")
    sv.add_argument("--max-body-bytes", type=int_argument(1, MAX_BODY_BYTES), default=1 << 20,
                    help=f"larger request bodies are refused with 413, 1..{MAX_BODY_BYTES} (a body is held in "
                         "memory) (default: %(default)s)")
    sv.add_argument("--chat-template", metavar="FILE", default=None,
                    help="Jinja2 chat template (Hugging Face's convention) for /v1/chat/completions (default: a plain "
                         "'User: ...\\n\\nAssistant:' transcript for base models; see docs/serving.md)")
    sv.add_argument("--chat-stop", action="append", default=None, metavar="TEXT",
                    help="stop sequence of every chat request (repeatable; default: '\\nUser:' with the plain "
                         "template, none with --chat-template; each 1..256 bytes, at most 32)")
    sv.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="a connection that has not sent a whole request head within this time (from its opening "
                         "or its previous response) gets a 408 and is closed (default: %(default)s)")
    sv.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="a request body that has not all arrived within this time gets a 408 (default: %(default)s)")
    sv.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="an idle kept-alive connection is closed after this time (default: %(default)s)")
    sv.add_argument("--max-connections", type=int, default=512, metavar="N",
                    help="connections and requests in progress at once; a request over it gets a 503 "
                         "(default: %(default)s)")
    sv.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="serve on Ray Serve replicas: alone, a local Ray cluster is started; with ADDRESS, joins it")
    sv.add_argument("--replicas", type=int_argument(1, 1024), default=1, help="Ray Serve replicas, each with its "
                    "own model and engine (with --ray), 1..1024 (default: %(default)s)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                    help="uvicorn's log level (default: %(default)s)")
    add_threads_argument(sv)
    sv.set_defaults(func=_cmd_serve)

    lt = sub.add_parser("serve-loadtest", help="a bounded load test of the server on loopback (docs/serving.md)")
    loadtest.add_arguments(lt)
    add_threads_argument(lt)
    lt.set_defaults(func=_cmd_serve_loadtest)


def _cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: the OpenAI-compatible server, in this process (uvicorn) or on Ray Serve replicas."""
    require("serve", "blt-decode serve")
    if args.ray is None and args.replicas != 1:
        raise CLIError("--replicas needs --ray (replicas are Ray Serve's)")
    if args.api_key == "":
        raise CLIError("--api-key is empty: give a key, or leave the flag out to serve without authentication")
    if args.backend != "auto":
        plugins.get_backend(args.backend)  # a bad name fails here, before anything else
    name = args.model_name or args.model
    # lazy: importing chat compiles the plain template with jinja2, which only a server needs
    from blt_decode.serving.chat import PLAIN, ChatTemplate

    # every limit a request is held to is checked here, in one line, before the model loads: a bad flag
    # would otherwise start a server that fails every request (or holds every slow client)
    limits = ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                              keep_alive_s=args.keep_alive_timeout, max_connections=args.max_connections)
    chat = PLAIN if args.chat_template is None else ChatTemplate.from_file(args.chat_template)
    if args.chat_stop is not None:
        chat = ChatTemplate(chat.source, tuple(args.chat_stop), name=chat.name)
    if args.chat_template is not None:
        chat.check()  # renders a sample conversation as requests are rendered (a worker, under the limits)
    try:  # a port in use is one line now, not a uvicorn traceback after the model has loaded
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as exc:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    # after every other check, so that the choice is said only for a server that starts; not in a replica
    args.backend = backend_for(args.backend, new_bytes=None, work="a server", device=args.device)
    where = f"http://{args.host}:{args.port}/v1"
    if args.ray is not None:
        if not args.ray:
            local_ray_environment()  # before Ray is imported: a local cluster listens on loopback only
        require("ray", "blt-decode serve --ray")
        from blt_decode.serving import ray_serve  # lazy, as are ray_data and ray: the ray extra
        from blt_decode.serving.ray_data import connect

        model_from_args(args)  # a bad spec, dtype or device is one line here, not a failure in every replica
        started = connect(args.ray or None)
        import ray

        # one CPU per replica, or a share of a smaller cluster (else replicas would wait for CPUs forever)
        cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / args.replicas)
        print(f"{PROG}: serving {name!r} on {args.replicas} Ray Serve replica(s) at {where} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        try:
            ray_serve.run(args.model, host=args.host, port=args.port, replicas=args.replicas, max_batch=args.max_batch,
                          backend=args.backend, model_name=name, api_key=args.api_key,
                          max_body_bytes=args.max_body_bytes, threads=args.threads, dtype=args.dtype,
                          device=args.device, num_cpus=cpus, chat_template=chat.source, chat_stops=chat.stops)
        finally:
            if started:
                ray.shutdown()
        return 0
    from blt_decode.serving.app import build_app, serve  # lazy: the serve extra (fastapi, uvicorn, prometheus)

    model = model_from_args(args)
    app = build_app(model, backend=args.backend, max_batch=args.max_batch, model_name=name,
                    api_key=args.api_key, max_body_bytes=args.max_body_bytes, chat_template=chat, limits=limits)
    compile_note(args.backend, each_graph=False)
    # compile before listening (as vLLM captures its graphs): no request waits on it; the engine's batches only
    seconds = plugins.warm_up(plugins.get_backend(args.backend), model, rows=(args.max_batch,), progress=True)
    if seconds is not None:
        print(f"{PROG}: {args.backend} backend warmed up for batches of up to {args.max_batch} in {seconds:.1f} s",
              file=sys.stderr, flush=True)
    print(f"{PROG}: serving {name!r} at {where} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _cmd_serve_loadtest(args: argparse.Namespace) -> int:
    require("serve", "blt-decode serve-loadtest")
    return loadtest.main(args)
