"""Resources: what one array task of a stage asks SLURM for, from site profiles and sweep files.

A site profile (``slurm/profiles/<name>.toml``) holds what differs between clusters (partitions,
GPUs per cell, site knobs, setup lines, container prefix); a sweep file may override any of it
for its study. Precedence, lowest to highest: ``Resources()`` defaults, the profile's
``[resources]``, the profile's ``[resources.<stage>]``, the sweep file's ``[resources]``, its
``[resources.<stage>]``, then ``--partition`` / ``--cpu-partition``. ``Table`` reads one TOML
table key by key and refuses keys nobody asked for, naming the file and the key.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from brainhpc import stages
from brainhpc.errors import BrainhpcError

REPO = Path(__file__).resolve().parents[2]
# Sweep files and site profiles: from the checkout, or, for a non-editable install (a container
# image), the copies setup.cfg installs under <prefix>/share/brainhpc.
_SHARE = Path(sys.prefix) / "share" / "brainhpc"
JOBS = REPO / "jobs" if (REPO / "jobs").is_dir() else _SHARE / "jobs"
PROFILES = (REPO / "slurm" / "profiles" if (REPO / "slurm" / "profiles").is_dir()
            else _SHARE / "profiles")

GPU_FLAGS = ("gpus-per-node", "gres")
NCCL_DEBUG = ("VERSION", "WARN", "INFO", "TRACE")  # NCCL_DEBUG's levels
# sbatch flags the sweep writes itself: slurm_extra may not set them (it names the knob instead)
_OWN_FLAGS = {"job-name": "", "partition": "partition", "time": "time_min",
              "cpus-per-task": "cpus_per_task", "mem": "mem_gb or mem_gb_per_gpu",
              "ntasks-per-node": "tasks_per_node", "gpus-per-node": "gpus_per_node",
              "gres": "gpus_per_node, gpu_type and gpu_flag", "gpus": "gpus_per_node",
              "nodes": "nodes", "account": "account", "qos": "qos", "constraint": "constraint",
              "exclude": "exclude", "reservation": "reservation", "wckey": "wckey",
              "array": "array_parallelism", "dependency": "", "output": "", "error": "",
              "open-mode": "", "signal": "", "requeue": ""}
# container prefix placeholders: {binds} for apptainer (--bind a,b:b:ro), {volumes} for
# podman/docker (-v a:a -v b:b:ro); ${VAR} is the shell's and left alone
PLACEHOLDERS = ("binds", "volumes")


class Table:
    """A TOML table being read: typed ``get``s, then ``done()`` refuses keys nobody asked for."""

    def __init__(self, data: dict, where: str, source: str):
        if not isinstance(data, dict):
            raise BrainhpcError(f"{source}: {where or 'top level'} must be a table, "
                                f"got {type(data).__name__}")
        self.data, self.where, self.source, self.seen = data, where, source, set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind, default=None, required: bool = False):
        self.seen.add(name)
        if name not in self.data:
            if required:
                raise BrainhpcError(f"{self.source}: missing key {self.key(name)}")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise BrainhpcError(f"{self.source}: {self.key(name)} must be {names}, "
                                f"got {value!r}")
        return value

    def strings(self, name: str, default=None, required: bool = False) -> list[str]:
        value = self.get(name, (list, str), default, required)
        value = [value] if isinstance(value, str) else value
        if value is not None and not all(isinstance(v, str) for v in value):
            raise BrainhpcError(f"{self.source}: {self.key(name)} must be a list of strings, "
                                f"got {value!r}")
        return value

    def table(self, name: str) -> Table:
        return Table(self.get(name, dict, {}), self.key(name), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise BrainhpcError(f"{self.source}: unknown key {self.key(unknown[0])}; valid keys "
                                f"here: {', '.join(sorted(self.seen))}")


def positive(value, key: str, source: str, zero_ok: bool = False):
    low = 0 if zero_ok else 1
    if value is not None and value < low:
        raise BrainhpcError(f"{source}: {key} must be >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class Resources:
    """What one array task of a stage asks SLURM for, and the site's pass-through knobs."""

    partition: str = "debug"  # GPU stages (STAGE_TABLE: generate, classify, segment) run here
    cpu_partition: str = ""  # CPU stages (prepare, evaluate, aggregate) run here; "" = partition
    gpus_per_node: int = 0  # GPUs per cell of a GPU stage; > 0 means device=cuda
    gpu_type: str = ""  # typed request ("a100" -> --gpus-per-node=a100:1)
    gpu_flag: str = "gpus-per-node"  # or "gres" (--gres=gpu[:type]:N) where cons_tres is off
    tasks_per_node: int = 0  # 0: gpus_per_node (one DDP task per GPU), at least 1
    cpus_per_task: int = 1
    mem_gb: float = 2
    mem_gb_per_gpu: float = 0  # > 0: --mem is at least this times gpus_per_node (see ``mem``)
    time_min: int = 30
    array_parallelism: int = 2  # at most this many array tasks of one array at once
    cells_per_task: int = 1  # > 1 packs small cells: one array task runs them one by one
    max_num_timeout: int = 3  # requeues after a time-out (preemptions do not count)
    nodes: int = 1  # a cell runs on one node (see _check_nodes)
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    reservation: str = ""
    wckey: str = ""  # no --wckey unless set (sites that enforce wckeys reject unknown ones)
    slurm_extra: dict = field(default_factory=dict)  # any other #SBATCH flag -> value
    srun_args: tuple[str, ...] = ()  # appended to srun's own arguments
    nccl_p2p_disable: bool = False  # export NCCL_P2P_DISABLE=1 (GPU stages): see slurm/README.md
    nccl_debug: str = ""  # export NCCL_DEBUG=<level> (GPU stages), one of NCCL_DEBUG

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def mem(self) -> float:
        """GB of ``--mem``: ``mem_gb``, or ``mem_gb_per_gpu`` per GPU when that is more, so a
        cell given four GPUs (four DDP ranks, each with its own batch and workers) gets four
        GPUs' worth of host memory without a per-stage ``mem_gb``."""
        return max(self.mem_gb, self.mem_gb_per_gpu * self.gpus_per_node)

    def env(self) -> list[str]:
        """``export`` lines of the NCCL knobs that are set, for stages with GPUs."""
        if not self.gpus_per_node:
            return []
        out = ["export NCCL_P2P_DISABLE=1"] if self.nccl_p2p_disable else []
        return out + ([f"export NCCL_DEBUG={self.nccl_debug}"] if self.nccl_debug else [])

    @classmethod
    def read(cls, t: Table, base: Resources) -> Resources:
        """``base`` with the keys that ``t`` sets; validated one key at a time."""
        changes = {}
        for f in fields(cls):
            if f.name == "srun_args":
                value = t.strings(f.name)
                value = None if value is None else tuple(value)
            else:
                kind = {"str": str, "int": int, "float": (int, float), "dict": dict,
                        "bool": bool}[f.type.split(" ")[0]]
                value = t.get(f.name, kind)
            if value is None:
                continue
            if f.type == "int":  # mem_gb (float) below: any amount > 0 (0.5 -> --mem=512M)
                positive(value, t.key(f.name), t.source,
                          zero_ok=f.name in ("gpus_per_node", "tasks_per_node", "max_num_timeout"))
            changes[f.name] = _checked(f.name, value, t.key(f.name), t.source)
        return replace(base, **changes)


def _checked(name: str, value, key: str, source: str):
    """One resources key's value, refused (naming the key) when no single value makes sense."""
    if name == "mem_gb" and value <= 0:
        raise BrainhpcError(f"{source}: {key} must be > 0, got {value!r}")
    if name == "mem_gb_per_gpu" and value < 0:
        raise BrainhpcError(f"{source}: {key} must be >= 0 (0: off), got {value!r}")
    if name == "gpu_flag" and value not in GPU_FLAGS:
        raise BrainhpcError(f"{source}: {key} must be one of {', '.join(GPU_FLAGS)}, "
                            f"got {value!r}")
    if name == "nccl_debug" and value not in ("", *NCCL_DEBUG):
        raise BrainhpcError(f"{source}: {key} must be one of {', '.join(NCCL_DEBUG)} (NCCL's "
                            f"levels), got {value!r}")
    if name == "nodes" and value != 1:
        raise BrainhpcError(
            f"{source}: {key} = {value}: multi-node cells are not supported. A cell "
            "is one model that fits one node (a 128 px model, global batch 32); its DDP "
            "rendezvous and its one output folder assume one node. Ask for more GPUs "
            "on one node with gpus_per_node, or run more cells at once "
            "(array_parallelism)")
    if name == "slurm_extra":
        return _slurm_extra(value, key, source)
    return value


def _slurm_extra(extra: dict, key: str, source: str) -> dict:
    out = {}
    for name, value in extra.items():
        flag = name.lstrip("-").replace("_", "-")
        if flag in _OWN_FLAGS:
            knob = _OWN_FLAGS[flag]
            hint = f"use resources.{knob}" if knob else "the sweep writes it itself"
            raise BrainhpcError(f"{source}: {key}.{name}: --{flag} is not a pass-through flag "
                                f"({hint})")
        if not isinstance(value, (str, int, float, bool)) or value is False:
            raise BrainhpcError(f"{source}: {key}.{name} must be a string, a number or true "
                                f"(a flag without value), got {value!r}")
        out[flag] = value
    return out


def check_stage(r: Resources, stage: str, source: str) -> None:
    """Combinations that no single key can refuse on its own."""
    where = f"{source}: resources.{stage}"
    if r.gpu_type and not r.gpus_per_node:
        raise BrainhpcError(f"{where}: gpu_type = {r.gpu_type!r} needs gpus_per_node >= 1")
    if r.cells_per_task > 1 and r.tasks > 1:
        raise BrainhpcError(f"{where}: cells_per_task = {r.cells_per_task} packs small "
                            f"one-task cells; these cells run {r.tasks} DDP tasks each. Set "
                            "cells_per_task = 1 or one task per cell")


def read_profile(ref: str, source: str) -> dict:
    path = Path(ref) if ref.endswith(".toml") else PROFILES / f"{ref}.toml"
    if not path.is_absolute() and ref.endswith(".toml"):
        path = Path(source).parent / path
    if not path.exists():
        have = ", ".join(sorted(p.stem for p in PROFILES.glob("*.toml")))
        raise BrainhpcError(f"{source}: profile {ref!r} not found ({path}); profiles in "
                            f"{PROFILES}: {have}, or give a path to a .toml file")
    return read_toml(path)


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BrainhpcError(f"{path}: not valid TOML ({e})") from e


def check_prefix(prefix: str, key: str, source: str) -> str:
    for name in re.findall(r"(?<!\$)\{([^{}]*)\}", prefix):
        if name not in PLACEHOLDERS:
            raise BrainhpcError(f"{source}: {key}: unknown placeholder {{{name}}}; valid: "
                                f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (shell "
                                "variables are written ${VAR})")
    return prefix


@dataclass(frozen=True)
class Site:
    """What a site profile says besides resources: its cluster, setup lines, container."""

    source: str
    cluster: str
    setup: tuple[str, ...]
    prefix: str
    binds: tuple[str, ...]
    resources: Table  # [resources] of the profile, read by load_resources

    @classmethod
    def read(cls, ref: str, source: str) -> Site:
        prof = Table(read_profile(ref, source), "", f"profile {ref}")
        prof.get("name", str)
        cluster = prof.get("cluster", str, "")
        setup = prof.strings("setup", [])
        res = prof.table("resources")
        container = prof.table("container")
        prefix = check_prefix(container.get("prefix", str, ""), "container.prefix", prof.source)
        binds = container.strings("binds", [])
        container.done()
        prof.done()
        return cls(prof.source, cluster, tuple(setup), prefix, tuple(binds), res)


def _stage_tables(res: Table) -> dict[str, Table]:
    return {s: Table(res.get(s, dict, {}), res.key(s), res.source) for s in stages.NAMES}


def load_resources(site: Site, res: Table, partition: str | None,
                   cpu_partition: str | None) -> dict[str, Resources]:
    """Every stage's resources, merged in the order of the module docstring; a CPU stage
    (``brainhpc.stages``) gets one task, no GPU, on the CPU partition."""
    prof_stages, own = _stage_tables(site.resources), _stage_tables(res)
    common = Resources.read(site.resources, Resources())
    out = {}
    for stage, kind in stages.TABLE.items():
        r = common
        for t in (prof_stages[stage], res, own[stage]):
            r = Resources.read(t, r)
            if t is not res and not kind.gpu and "partition" in t.data:
                r = replace(r, cpu_partition=r.partition)  # a CPU stage's own partition
        if partition:
            r = replace(r, partition=partition)
        if cpu_partition:
            r = replace(r, cpu_partition=cpu_partition)
        if not kind.gpu:
            r = replace(r, partition=r.cpu_partition or r.partition, gpus_per_node=0,
                        gpu_type="", tasks_per_node=1)
        check_stage(r, stage, res.source)
        out[stage] = r
    for t in (*prof_stages.values(), site.resources, *own.values(), res):
        t.done()
    return out

