"""Multi-process training through Ignite's ``idist`` (``torchrun`` / ``idist.Parallel``), one helper per concern.

With a single process every helper is a no-op, so the engines run unchanged. Under several processes:

* trainable networks are wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which averages
  gradients across processes in the backward pass;
* each process draws its own data (a ``DistributedSampler`` shard or a rank-offset random seed);
* only the main process writes files; the others wait at a barrier where they must read them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "data_parallel",
    "initialise_from_environment",
    "process_device",
    "distributed_loader",
    "is_main_process",
    "shut_down",
    "synchronise",
    "world_size",
]

logger = logging.getLogger(__name__)

# The last barrier of each shut_down(), alive until the interpreter exits (see shut_down for why).
_final_barriers: list[Any] = []


def initialise_from_environment() -> bool:
    """Join the process group that ``torchrun`` describes in the environment, once.

    ``python -m monai.bundle run`` knows nothing about ``torchrun``; the workflows call this first so
    ``torchrun --nproc_per_node N -m monai.bundle run prune ...`` trains on N processes (NCCL on GPUs,
    gloo on CPUs). Returns whether the run is distributed.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and idist.get_world_size() == 1:
        idist.initialize("nccl" if torch.cuda.is_available() else "gloo")
        logger.info(
            "joined a distributed run: rank %d, world size: %d, backend %s",
            idist.get_rank(),
            idist.get_world_size(),
            idist.backend(),
        )
    return idist.get_world_size() > 1


def process_device(device: str | torch.device) -> torch.device:
    """The device of this process: a requested ``cuda`` becomes this process's own GPU when distributed."""
    device = torch.device(device)
    if device.type == "cuda" and world_size() > 1:
        return idist.device()
    return device


def world_size() -> int:
    """Number of processes of the run (1 when not distributed)."""
    return idist.get_world_size()


def is_main_process() -> bool:
    """True on the process that writes files and logs progress (rank 0)."""
    return idist.get_rank() == 0


def synchronise() -> None:
    """Wait for every process (no-op when not distributed)."""
    if world_size() > 1:
        idist.barrier()


def shut_down() -> None:
    """Wait for every process, then leave the process group so that the interpreter can exit safely.

    The bundles call this in ``finalize`` under ``torchrun``; a no-op without a process group. The handle of
    the final barrier is kept alive on purpose until the interpreter exits. gloo's worker threads outlive
    ``destroy_process_group`` (DDP keeps the group), and a barrier holds the collectives still in flight
    when it started; if a worker dropped the last reference to one after the main thread had begun to
    finalise Python, freeing its tensors would need the GIL and the process would abort ("terminate called
    without an active exception", a 1-in-8 flaky failure of the two-process training test). Held here, the
    barrier and what it holds are freed by the main thread at exit instead.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    barrier = dist.barrier(async_op=True)
    if barrier is not None:
        barrier.wait()
        _final_barriers.append(barrier)
    if idist.model_name() == "native-dist":
        idist.finalize()  # destroys the group and lets idist report a single process again
    else:
        dist.destroy_process_group()


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` itself, or wrapped for gradient averaging when several processes train it.

    Only the wrapper's ``forward`` triggers DDP's gradient synchronisation, so callers must run the
    training forward pass through the returned module.
    """
    if world_size() == 1:
        return module
    if device.type != "cuda":
        return nn.parallel.DistributedDataParallel(module)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return nn.parallel.DistributedDataParallel(module, device_ids=[index])


def distributed_loader(
    dataset: Dataset | Sequence[Any], batch_size: int, shuffle: bool, seed: int, **kwargs: Any
) -> DataLoader:
    """A MONAI ``DataLoader`` over this process's shard (``DistributedSampler``) or over everything.

    MONAI's workflows set a ``DistributedSampler``'s epoch at each epoch start, so shuffles differ
    between epochs and a resumed run draws what an uninterrupted one would.
    """
    from monai.data import DataLoader as MonaiDataLoader

    if world_size() == 1:
        return MonaiDataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs)
    sampler = DistributedSampler(
        dataset, num_replicas=world_size(), rank=idist.get_rank(), shuffle=shuffle, seed=seed, drop_last=False
    )
    return MonaiDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
