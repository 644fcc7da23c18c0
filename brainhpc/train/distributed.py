"""Process-group set-up and teardown for one training process, however it was launched.

* torchrun (or any launcher setting ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/
  ``MASTER_PORT``): the group is initialised from those variables.
* SLURM tasks (``srun`` or submitit: ``SLURM_JOB_ID`` and ``SLURM_PROCID`` set, more than one task
  in the step, no ``WORLD_SIZE``): ``slurm_environment`` derives the same variables from the
  step (rank = ``SLURM_PROCID``, master = first host of the step's node list, port from the job
  and step ids, the same on every task) and they are exported before the group is made.
* Anything else is a single process; no group is created.

The backend is NCCL on CUDA (device = local rank, modulo the visible GPUs so that one GPU per
task also works) and gloo on CPU. ``teardown`` is the order that makes torchrun ranks exit
cleanly: drop the DDP wrappers first, barrier, then destroy the group.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from brainhpc.errors import BrainhpcError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, local rank, its device and backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no group
    owns_group: bool = False  # True when init_distributed created the group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise BrainhpcError(f"environment variable {name}={value!r} is not an integer") from e


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in DEVICES:
        raise BrainhpcError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BrainhpcError("device 'cuda' requested but torch sees no CUDA device")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[07-09,12],cpu3"`` -> ``"gpu07"``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    group = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], group)
    if not host or "[" in host or "]" in host:
        raise BrainhpcError(f"SLURM node list {nodelist!r}: cannot read its first host "
                            "(expected e.g. 'node07' or 'node[07-09,12]')")
    return host


def slurm_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """torch's env:// variables for one task of a multi-task SLURM step, or None if not in one.

    Only ``srun`` tasks have ``SLURM_PROCID``; a batch script of a job with ``--ntasks=2`` has
    ``SLURM_NTASKS=2`` but is one process, and must not wait for a partner. Step variables win
    over job variables (a step may use part of the allocation). ``MASTER_PORT`` is kept when
    set, else drawn from the job and step ids so that every task of the step computes the same
    port without talking to the others (as submitit does from the job id).
    """
    def num(*keys: str, default: int | None = None) -> int | None:
        for key in keys:
            value = env.get(key, "")
            if value != "":
                try:
                    return int(value)
                except ValueError as e:
                    raise BrainhpcError(
                        f"environment variable {key}={value!r} is not an integer") from e
        return default

    if not env.get("SLURM_JOB_ID") or env.get("SLURM_PROCID", "") == "":
        return None
    world = num("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    if world <= 1:
        return None
    rank = num("SLURM_PROCID")
    if not 0 <= rank < world:
        raise BrainhpcError(f"SLURM_PROCID={rank} is outside the step's {world} tasks")
    nodes = num("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=1)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or \
        env.get("SLURMD_NODENAME")
    if not nodelist:
        raise BrainhpcError("SLURM task without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: "
                            "cannot tell which host runs rank 0")
    port = env.get("MASTER_PORT") or str(
        random.Random(f"{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}")
        .randint(20000, 60000))
    return {"RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(num("SLURM_LOCALID", default=0)),
            "LOCAL_WORLD_SIZE": str(max(1, world // max(1, nodes))),
            "MASTER_ADDR": first_host(nodelist), "MASTER_PORT": port}


def allocated_cpus(env: Mapping[str, str] | None = None) -> int:
    """CPUs this process may use: the cores it may run on, capped by SLURM's ``--cpus-per-task``
    (a job on a node without CPU binding still sees every core, but was granted only these)."""
    env = os.environ if env is None else env
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    granted = env.get("SLURM_CPUS_PER_TASK", "") if env.get("SLURM_JOB_ID") else ""
    if granted.isdigit() and int(granted) > 0:
        cpus = min(cpus, int(granted))
    return max(1, cpus)


def cpu_threads(local_world_size: int, current: int | None = None,
                cpus: int | None = None) -> int:
    """Intra-op threads for one of ``local_world_size`` CPU ranks sharing this node's cores.

    Never more than ``current`` (an explicit ``torch.set_num_threads``/``OMP_NUM_THREADS`` by
    the user or launcher wins): oversubscribed OpenMP pools make every rank wait at every
    barrier for a descheduled thread, which is what makes CPU DDP crawl.
    """
    if cpus is None:
        cpus = allocated_cpus()
    current = torch.get_num_threads() if current is None else current
    return max(1, min(current, cpus // max(1, local_world_size)))


def fit_threads(local_world_size: int = 1) -> int:
    """Lower torch's intra-op threads to this rank's share of the allocation; returns them."""
    threads = cpu_threads(local_world_size)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        log.info("%d CPU threads (%d allocated CPUs, %d rank(s) on this node)", threads,
                 allocated_cpus(), local_world_size)
    return threads


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or create) the process group this process was launched into; see module docstring."""
    if dist.is_available() and dist.is_initialized():  # the caller set it up already
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        dev = _pick_device(device, local)
        return DistInfo(rank, world, local, dev, dist.get_backend(), owns_group=False)

    world = _env_int("WORLD_SIZE")
    if world is None:
        slurm = slurm_environment(os.environ)
        if slurm is not None:
            os.environ.update(slurm)
            log.info("SLURM task %s/%s, master %s:%s", slurm["RANK"], slurm["WORLD_SIZE"],
                     slurm["MASTER_ADDR"], slurm["MASTER_PORT"])
            world = int(slurm["WORLD_SIZE"])
    if not world or world <= 1:
        fit_threads(1)
        return DistInfo(device=_pick_device(device, 0))

    rank = _env_int("RANK")
    local = _env_int("LOCAL_RANK", 0)
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(key):
            raise BrainhpcError(
                f"WORLD_SIZE={world} but {key} is not set: launch with torchrun or as SLURM tasks")
    dev = _pick_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "gloo":
        # before the group exists (and before any pool is used): ranks share the node's cores
        fit_threads(_env_int("LOCAL_WORLD_SIZE", world) or world)
        if (os.environ["MASTER_ADDR"] in LOOPBACK and "GLOO_SOCKET_IFNAME" not in os.environ):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # all ranks are here: no NIC guessing
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    log.info("rank %d/%d (local %d) on %s with %s", rank, world, local, dev, backend)
    return DistInfo(rank, world, local, dev, backend, owns_group=True)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def teardown(info: DistInfo) -> None:
    """Barrier then destroy the group we created (callers drop their DDP wrappers first)."""
    if info.owns_group and dist.is_initialized():
        barrier(info)
        dist.destroy_process_group()
        info.owns_group = False
