"""Batch generation on Ray Data: ``blt-decode generate --input IN --output OUT --ray [ADDRESS]``, the batch
job of :mod:`blt_decode.tools.jobs` over a pool of Ray actors (see docs/serving.md)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from blt_decode.model.blt import BLTModel
from blt_decode.serving import local_ray_environment, require
from blt_decode.tools import jobs

class GenerateActor:
    """One actor of the pool: a model and a batched engine, decoding the batches Ray Data hands it."""

    def __init__(self, model: Any, backend: str = "eager", batch_size: int = 16, threads: int = 1,
                 dtype: str | None = None, device: str | None = None):
        import ray
        import torch

        from blt_decode.api import load_model
        from blt_decode.engine.core import Engine
        from blt_decode.plugins import registry as plugins

        if threads:
            torch.set_num_threads(threads)
        if isinstance(model, ray.ObjectRef):  # a model object put in the object store by the driver
            model = ray.get(model)
        loaded = load_model(model, dtype=getattr(torch, dtype) if dtype else None, device=device)
        self.engine = Engine(loaded, backend=backend, max_batch=batch_size)
        # compile before the first batch, as serve's replicas do (a no-op on eager)
        plugins.warm_up(plugins.get_backend(backend), loaded, rows=(batch_size,))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        requests = [pickle.loads(r) for r in batch["request"]]
        ids = [str(i) for i in batch["id"]]
        streams: list[Any] = []
        for request in requests:
            try:
                streams.append(self.engine.submit_request(request))
            except Exception as exc:  # validated by the driver; a failure here stays with its request
                streams.append(exc)
        self.engine.run_until_idle()
        records = []
        for ident, s in zip(ids, streams):
            record = (jobs.result_record(ident, None, None, s) if isinstance(s, BaseException)
                      else jobs.result_record(ident, s.output, s.stats, s.error))
            records.append(json.dumps(record, ensure_ascii=False))
        return {"id": ids, "record": records}


def connect(address: str | None) -> bool:
    """Join the cluster at ``address``, or start a local one (``None``, "" or "local": this machine only,
    on loopback, see :func:`~blt_decode.serving.local_ray_environment`); True when this call started Ray
    (so the caller shuts it down). A session already initialised is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        local_ray_environment()  # effective only if Ray was not imported yet: callers set it first
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def run_job_ray(model: str | Path | BLTModel, items: Sequence[jobs.JobItem], output: str | Path, *,
                address: str | None = None, actors: int = 2, batch_size: int = 16, backend: str = "eager",
                threads: int = 1, dtype: str | None = None, device: str | None = None,
                progress: bool = True) -> jobs.JobSummary:
    """Run the items not yet in ``output`` on Ray Data, ``actors`` actors with one model each, appending a
    line per finished request (the records of :func:`blt_decode.tools.jobs.run_job`)."""
    if address in (None, "", "local"):
        local_ray_environment()
    require("ray", "generate --ray")
    import ray
    import ray.data

    done_before = jobs.finished_ids(output)
    todo = [item for item in items if item.id not in done_before]
    failed = new_bytes = 0
    if not todo:
        return jobs.JobSummary(len(items), len(items), 0, 0, 0)
    started = connect(address)
    try:
        model_arg = ray.put(model) if isinstance(model, BLTModel) else str(model)
        # the requests travel pickled: the actors get exactly the Request objects the driver validated
        rows = [{"id": item.id, "request": pickle.dumps(item.request)} for item in todo]
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
        results = dataset.map_batches(
            GenerateActor,
            fn_constructor_kwargs={"model": model_arg, "backend": backend, "batch_size": batch_size,
                                   "threads": threads, "dtype": dtype, "device": device},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=max(threads, 1),
        )
        with tqdm(total=len(items), initial=len(items) - len(todo), desc="generate (ray)", unit="req",
                  disable=not progress) as bar:
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                records = [json.loads(r) for r in batch["record"]]
                jobs.append_records(output, records)
                failed += sum("error" in r for r in records)
                new_bytes += sum(len(r.get("output_bytes_hex", "")) // 2 for r in records)
                bar.update(len(records))
    finally:
        if started:
            ray.shutdown()
    return jobs.JobSummary(len(items), len(items) - len(todo), len(todo), failed, new_bytes)
