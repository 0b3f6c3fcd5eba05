"""Many processes with torchrun (the stock launcher; nothing home-made): DDP or FSDP
(docs/training.md, "One process or many")."""

from __future__ import annotations

import os
from typing import Iterable, Literal, Mapping

import attrs
import torch
import torch.distributed as dist
from torch import nn

from blt_decode.errors import TrainingError

Parallel = Literal["ddp", "fsdp"]


@attrs.frozen
class World:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str) -> World:
    """Join the torchrun process group if there is one, and pick this process's device."""
    if device not in ("cpu", "cuda"):
        raise TrainingError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available here (use --device cpu)")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return World(rank, size, local, dev)


def teardown(world: World) -> None:
    """Leave the process group (only when :func:`setup` joined one)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait until every process reaches this point; nothing without torchrun."""
    if world.distributed:
        dist.barrier()


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of ``values`` over all processes (the tensor itself without torchrun)."""
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_object(value: object, world: World) -> object:
    """Rank 0's ``value`` on every process (small JSON-like values only, e.g. θ)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(step_module: nn.Module, parallel: Parallel, world: World, global_layers: Iterable[nn.Module],
         frozen: Iterable[nn.Parameter]) -> nn.Module:
    """The training-step module wrapped for ``parallel`` across the processes (unchanged with one)."""
    if not world.distributed:
        return step_module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(step_module, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        ignored = set(frozen)
        for layer in global_layers:
            fully_shard(layer)
        fully_shard(step_module, ignored_params=ignored or None)
        return step_module
    raise TrainingError(f"--parallel must be ddp or fsdp, got {parallel!r}")


def _full(value: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    # a sharded (FSDP) tensor is gathered: collective, so every process calls this in the same order
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full CPU copies of possibly sharded tensors (collective under FSDP: call on every process)."""
    return {k: _full(v).detach().cpu() for k, v in tensors.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (collective under FSDP)."""
    state = optimizer.state_dict()
    return {"state": {i: {k: (_full(v).detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def shard_like(full: Mapping[int, dict], params: list[nn.Parameter]) -> dict[int, dict]:
    """Optimizer state of full tensors laid out like ``params`` (sharded where they are sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out: dict[int, dict] = {}
    for index, fields in full.items():
        param = params[index]
        out[index] = {}
        for key, value in fields.items():
            if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
                # every process holds the full tensor (read from the files): no need to scatter it
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None)
            out[index][key] = value
    return out
