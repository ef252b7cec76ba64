"""Process group and DeviceMesh of a parallel model instance.

One mesh holds every parallel dimension, outermost first: ``pp`` (stages hand activations to the next
rank), ``cfg`` (transformer rows split), ``ring`` x ``ulysses`` (sequence parallel, the sub-mesh
diffusers' ContextParallelConfig takes) and ``tp`` (weights sharded). Dimensions of size 1 stay in
the mesh so every rank can always ask for its coordinate along any of them.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from omni_backend.config import ParallelConfig

MESH_DIMS = ("pp", "cfg", "ring", "ulysses", "tp")


def mesh_shape(parallel: ParallelConfig) -> tuple[int, ...]:
    return (
        parallel.pipeline_parallel_size,
        parallel.cfg_parallel_size,
        parallel.ring_degree,
        parallel.ulysses_degree,
        parallel.tensor_parallel_size,
    )


@dataclass
class ParallelGroups:
    """This rank's view of the group: its device, the mesh and its coordinates."""

    parallel: ParallelConfig
    rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def local_rank(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    def size(self, dim: str) -> int:
        return self.mesh.size(MESH_DIMS.index(dim))

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)

    def global_rank(self, **coords: int) -> int:
        """The global rank at this rank's coordinates, with ``coords`` replaced (e.g. ``pp=0``)."""
        index = [coords.get(d, self.local_rank(d)) for d in MESH_DIMS]
        return int(self.mesh.mesh[tuple(index)].item())


def rank_device(base: torch.device, rank: int) -> torch.device:
    """Consecutive GPUs from the instance's device id, one per rank; on the CPU every rank shares it."""
    if base.type == "cuda":
        return torch.device("cuda", (base.index or 0) + rank)
    return base


def init_process_group(rank: int, world_size: int, device: torch.device, init_method: str, timeout_s: float) -> None:
    """NCCL between GPUs, gloo on the CPU. ``timeout_s`` bounds a collective whose peer died."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def build_groups(parallel: ParallelConfig, device: torch.device) -> ParallelGroups:
    """The mesh over the already initialized default process group."""
    if dist.get_world_size() != parallel.world_size:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks, the config needs {parallel.world_size}")
    mesh = init_device_mesh(device.type, mesh_shape(parallel), mesh_dim_names=MESH_DIMS)
    return ParallelGroups(parallel, dist.get_rank(), device, mesh)


def rendezvous(directory: str) -> str:
    """The ``init_method`` of one group: a file in ``directory``, a folder of its own.

    A file, not a TCP port: a port picked free before rank 0 binds it can be handed to another
    group (two models loading at once) or to any other process in between; a fresh file cannot."""
    return "file://" + os.path.join(directory, "rendezvous")


def cpu_threads_per_rank(world_size: int) -> int:
    """An even share of this process's cores for each CPU rank (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // world_size)
