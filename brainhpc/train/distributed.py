"""Process-group set-up and teardown for one training process, however it was launched.

* torchrun (or any launcher setting ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/
  ``MASTER_PORT``): the group is initialised from those variables.
* SLURM tasks (``srun`` or submitit: ``SLURM_JOB_ID`` and ``SLURM_PROCID`` set, more than one task
  in the step, no ``WORLD_SIZE``): ``slurm_environment`` derives the same variables from the
  step (rank = ``SLURM_PROCID``, master = first host of the step's node list, port from the job
  and step ids, the same on every task) and they are exported before the group is made.
* Anything else is a single process; no group is created.

The backend is NCCL on CUDA and gloo on CPU. The GPU: with several visible, the one of the
local rank; with one visible, that one (a site that shows each task its own GPU); ranks that
would share a GPU are refused (``gpu_index``). The group's timeout is
``BRAINHPC_DIST_TIMEOUT_MINUTES`` (30 by default).

``teardown`` is the order that makes torchrun ranks exit cleanly: drop the DDP wrappers first,
barrier, then destroy the group. A rank that fails must not enter that barrier (its peers wait in
another collective and nothing would move until the timeout): ``teardown(info, failed=True)``
publishes the failure in the group's store and aborts the group, and every rank's ``PeerWatch``
(a thread polling that store) ends its process when a peer failed or rank 0's store is gone.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from brainhpc.errors import BrainhpcError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
LOOPBACK = ("localhost", "127.0.0.1", "::1")
TIMEOUT_ENV = "BRAINHPC_DIST_TIMEOUT_MINUTES"
FAILED_KEY = "brainhpc/failed"  # set in the group's store by a rank that fails
PEER_POLL_S = 2.0  # how often every rank looks for a peer's failure
PEER_FAILED_EXIT = 3  # exit status of a rank ended because a peer failed


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, local rank, its device and backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no group
    owns_group: bool = False  # True when init_distributed created the group (and must destroy it)
    watch: PeerWatch | None = field(default=None, repr=False)
    # called with the reason before a peer's failure ends this process (rank 0 records it)
    on_peer_failure: Callable[[str], None] | None = field(default=None, repr=False)

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


def gpu_index(local_rank: int, local_world: int | None, count: int,
              env: Mapping[str, str] | None = None) -> int:
    """The visible GPU of this rank: its local rank when several are visible, 0 when it sees one
    (a site that gives each task its own GPU through CUDA_VISIBLE_DEVICES). Every rank of the
    node decides alike, so a refusal stops all of them instead of leaving some in the
    rendezvous: two ranks on one GPU run at half speed or fail in NCCL."""
    env = os.environ if env is None else env
    local_world = local_world or local_rank + 1
    if count > 1 and local_world <= count:
        return local_rank
    if count == 1 and (local_world == 1 or env.get("CUDA_VISIBLE_DEVICES")):
        return 0
    raise BrainhpcError(
        f"{local_world} ranks on this node but {count} visible GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(unset)')}): ranks would share "
        "a GPU; ask for one GPU per task (e.g. --gpus-per-task=1) or fewer tasks per node")


def local_placement() -> tuple[int, int | None]:
    """(local rank, ranks on this node) from torchrun's or SLURM's variables."""
    local = _env_int("LOCAL_RANK", _env_int("SLURM_LOCALID", 0))
    return local, _env_int("LOCAL_WORLD_SIZE")


def device_for(device: str, local_rank: int = 0, local_world: int | None = 1) -> torch.device:
    """The device ``device`` (auto | cpu | cuda) means for this rank; touches no GPU state."""
    if device not in DEVICES:
        raise BrainhpcError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BrainhpcError("device 'cuda' requested but torch sees no CUDA device")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", gpu_index(local_rank, local_world,
                                              torch.cuda.device_count()))
    return torch.device("cpu")


def _pick_device(device: str, local_rank: int, local_world: int | None = 1) -> torch.device:
    dev = device_for(device, local_rank, local_world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


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


def _timeout_minutes(default: float) -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        minutes = float(value) if value else default
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise BrainhpcError(f"{TIMEOUT_ENV}={value!r} must be a number of minutes > 0")
    return minutes


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or create) the process group this process was launched into; see module docstring."""
    if dist.is_available() and dist.is_initialized():  # the caller set it up already
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        dev = _pick_device(device, local, _env_int("LOCAL_WORLD_SIZE"))
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
    local_world = _env_int("LOCAL_WORLD_SIZE", world) or world
    dev = _pick_device(device, local, local_world)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "gloo":
        # before the group exists (and before any pool is used): ranks share the node's cores
        fit_threads(local_world)
        if (os.environ["MASTER_ADDR"] in LOOPBACK and "GLOO_SOCKET_IFNAME" not in os.environ):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # all ranks are here: no NIC guessing
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=_timeout_minutes(timeout_minutes)))
    log.info("rank %d/%d (local %d) on %s with %s", rank, world, local, dev, backend)
    info = DistInfo(rank, world, local, dev, backend, owns_group=True)
    info.watch = PeerWatch.start(info)
    return info


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


class PeerWatch:
    """A daemon thread that ends this process when another rank failed (it set ``FAILED_KEY`` in
    the group's store) or rank 0, which holds the store, is gone. Without it a rank waiting in a
    collective for a dead peer waits for the whole group timeout (NCCL notices nothing)."""

    def __init__(self, store, info: DistInfo, poll_s: float = PEER_POLL_S):
        self.store, self.info, self.poll_s = store, info, poll_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="brainhpc-peer-watch", daemon=True)

    @classmethod
    def start(cls, info: DistInfo) -> PeerWatch | None:
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception as e:  # a private torch API: without it, the group timeout remains
            log.warning("no peer-failure watch (%s): a failed rank's peers wait for the "
                        "group timeout", e)
            return None
        watch = cls(store, info)
        watch.thread.start()
        return watch

    def stop(self) -> None:
        self.stopped.set()

    def publish(self, reason: str) -> None:
        """Tell the other ranks that this one failed (after stopping our own watch)."""
        self.stop()
        try:
            self.store.set(FAILED_KEY, f"rank {self.info.rank} failed: {reason}")
        except Exception as e:
            log.warning("could not tell the other ranks of this failure: %s", e)

    def _run(self) -> None:
        lost = 0
        while not self.stopped.wait(self.poll_s):
            try:
                failed = self.store.check([FAILED_KEY])
                reason = self.store.get(FAILED_KEY).decode(errors="replace") if failed else None
                lost = 0
            except Exception as e:  # rank 0's store is gone: a few misses, then give up
                lost += 1
                reason = f"the group's store (rank 0) is unreachable: {e}" if lost >= 3 else None
            if reason is not None:
                self._end(reason)
                return

    def _end(self, reason: str) -> None:
        if self.stopped.is_set():
            return  # our own teardown began: the peers left normally
        log.error("rank %d: %s; ending this process instead of waiting for the group timeout",
                  self.info.rank, reason)
        hook = self.info.on_peer_failure
        try:
            if hook is not None:
                hook(reason)
        finally:
            logging.shutdown()
            os._exit(PEER_FAILED_EXIT)


def _abort(info: DistInfo, reason: str) -> None:
    """A failing rank: tell the peers, then drop the group without any collective."""
    if info.watch is not None:
        info.watch.publish(reason)
    try:
        if info.backend == "nccl":
            dist.distributed_c10d._abort_process_group()  # pending NCCL work may never finish
        else:
            dist.destroy_process_group()
    except Exception as e:  # never hide the failure being raised
        log.warning("process group abort: %s", e)


def teardown(info: DistInfo, failed: BaseException | bool = False) -> None:
    """Barrier then destroy the group we created (callers drop their DDP wrappers first); after
    a failure (``failed``: the exception, or True) no barrier: the peers are told and the group
    aborted, so nobody waits for the timeout."""
    if not (info.owns_group and dist.is_initialized()):
        return
    info.owns_group = False
    if failed:
        reason = f"{type(failed).__name__}: {failed}" if isinstance(failed, BaseException) \
            else "error"
        _abort(info, reason)
        return
    barrier(info)
    if info.watch is not None:
        info.watch.stop()  # after the barrier: until then a peer may still fail
    dist.destroy_process_group()
