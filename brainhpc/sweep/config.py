"""Sweep files (jobs/*.toml) and site profiles -> typed, validated ``Sweep`` objects.

A sweep file names the data, the cells of each stage and, optionally, resources for this study;
a site profile (``slurm/profiles/<name>.toml``) holds what differs between clusters (partitions,
GPUs per cell, site knobs, setup lines, container prefix). Every key is checked before anything
is submitted: an unknown key or a bad value raises ``BrainhpcError`` naming the file and the key.
``STAGE_TABLE`` below is the one place that lists the stages and which of them use GPUs. Layout::

    name = "smoke"
    profile = "local"              # slurm/profiles/local.toml, or a path to a profile file
    [data]                         # exactly one of path / phantom
    path = "~/data/mri/Training"   # relative paths: from the directory you run the sweep in
    phantom = 200
    size = 64
    [generate]                     # archs x labels cells (optional stage)
    archs = ["vae", "dcgan"]
    [generate.options.dcgan]       # architecture options for one arch
    [classify]                     # defaults for every block below
    seeds = [0]
    [[classify.cells]]             # one block: model x train_data x techniques x seeds
    model = "vae"
    techniques = ["giaem", "dbscan"]
    train_data = ["real", "synthetic:vae"]
    [resources]                    # every stage (over the profile's); [resources.<stage>] one stage
    [container]
    prefix = "apptainer exec --nv --bind {binds} IMAGE"

Resources, lowest to highest precedence: ``Resources()`` defaults, the profile's ``[resources]``,
the profile's ``[resources.<stage>]``, the sweep file's ``[resources]``, its
``[resources.<stage>]``, then ``--partition`` / ``--cpu-partition``.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from brainhpc import models
from brainhpc.classify.data import parse_train_spec
from brainhpc.data.shards import LABELS
from brainhpc.errors import BrainhpcError

REPO = Path(__file__).resolve().parents[2]
# Sweep files and site profiles: from the checkout, or, for a non-editable install (a container
# image), the copies setup.cfg installs under <prefix>/share/brainhpc.
_SHARE = Path(sys.prefix) / "share" / "brainhpc"
JOBS = REPO / "jobs" if (REPO / "jobs").is_dir() else _SHARE / "jobs"
PROFILES = (REPO / "slurm" / "profiles" if (REPO / "slurm" / "profiles").is_dir()
            else _SHARE / "profiles")


@dataclass(frozen=True)
class Stage:
    """How a stage runs: ``gpu`` stages get ``gpus_per_node`` GPUs (one DDP task per GPU,
    device=cuda) on a GPU profile; CPU stages run one task, no GPU, on ``cpu_partition``.
    ``after``: the stages whose jobs must have ended (afterany) before this stage starts."""

    gpu: bool
    after: tuple[str, ...] = ()


# The stages in submission order. Adding one: a line here, its cells in cells.expand and its
# function in cells.stage_config / cells.run_stage (see README "Adding a stage").
STAGE_TABLE: dict[str, Stage] = {
    "prepare": Stage(gpu=False),
    "generate": Stage(gpu=True, after=("prepare",)),
    "classify": Stage(gpu=True, after=("prepare", "generate")),
    "aggregate": Stage(gpu=False, after=("prepare", "generate", "classify")),
}
STAGES = tuple(STAGE_TABLE)
GPU_STAGES = tuple(s for s, k in STAGE_TABLE.items() if k.gpu)
CLASSIFY_MODELS = ("cnn", "vae")
TECHNIQUES = ("giaem", "dbscan", "kmeans-single", "kmeans-global")
GPU_FLAGS = ("gpus-per-node", "gres")
# sbatch flags the sweep writes itself: slurm_extra may not set them (it names the knob instead)
_OWN_FLAGS = {"job-name": "", "partition": "partition", "time": "time_min",
              "cpus-per-task": "cpus_per_task", "mem": "mem_gb",
              "ntasks-per-node": "tasks_per_node", "gpus-per-node": "gpus_per_node",
              "gres": "gpus_per_node, gpu_type and gpu_flag", "gpus": "gpus_per_node",
              "nodes": "nodes", "account": "account", "qos": "qos", "constraint": "constraint",
              "exclude": "exclude", "reservation": "reservation", "wckey": "wckey",
              "array": "array_parallelism", "dependency": "", "output": "", "error": "",
              "open-mode": "", "signal": "", "requeue": ""}
# container prefix placeholders: {binds} for apptainer (--bind a,b:b:ro), {volumes} for
# podman/docker (-v a:a -v b:b:ro); ${VAR} is the shell's and left alone
PLACEHOLDERS = ("binds", "volumes")


class _Table:
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

    def table(self, name: str) -> _Table:
        return _Table(self.get(name, dict, {}), self.key(name), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise BrainhpcError(f"{self.source}: unknown key {self.key(unknown[0])}; valid keys "
                                f"here: {', '.join(sorted(self.seen))}")


def _positive(value, key: str, source: str, zero_ok: bool = False):
    low = 0 if zero_ok else 1
    if value is not None and value < low:
        raise BrainhpcError(f"{source}: {key} must be >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class Resources:
    """What one array task of a stage asks SLURM for, and the site's pass-through knobs."""

    partition: str = "debug"
    cpu_partition: str = ""  # CPU stages (STAGE_TABLE) run here; "" = partition
    gpus_per_node: int = 0  # GPUs per cell of a GPU stage; > 0 means device=cuda
    gpu_type: str = ""  # typed request ("a100" -> --gpus-per-node=a100:1)
    gpu_flag: str = "gpus-per-node"  # or "gres" (--gres=gpu[:type]:N) where cons_tres is off
    tasks_per_node: int = 0  # 0: gpus_per_node (one DDP task per GPU), at least 1
    cpus_per_task: int = 1
    mem_gb: float = 2
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

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @classmethod
    def read(cls, t: _Table, base: Resources) -> Resources:
        """``base`` with the keys that ``t`` sets; validated one key at a time."""
        changes = {}
        for f in fields(cls):
            if f.name == "srun_args":
                value = t.strings(f.name)
                value = None if value is None else tuple(value)
            else:
                kind = {"str": str, "int": int, "float": (int, float), "dict": dict}[
                    f.type.split(" ")[0]]
                value = t.get(f.name, kind)
            if value is None:
                continue
            key = t.key(f.name)
            if f.type in ("int", "float"):
                _positive(value, key, t.source,
                          zero_ok=f.name in ("gpus_per_node", "tasks_per_node", "max_num_timeout"))
            if f.name == "mem_gb" and value <= 0:
                raise BrainhpcError(f"{t.source}: {key} must be > 0, got {value!r}")
            if f.name == "gpu_flag" and value not in GPU_FLAGS:
                raise BrainhpcError(f"{t.source}: {key} must be one of {', '.join(GPU_FLAGS)}, "
                                    f"got {value!r}")
            if f.name == "nodes" and value != 1:
                raise BrainhpcError(
                    f"{t.source}: {key} = {value}: multi-node cells are not supported. A cell "
                    "is one model that fits one node (a 128 px model, global batch 32); its DDP "
                    "rendezvous and its one output folder assume one node. Ask for more GPUs "
                    "on one node with gpus_per_node, or run more cells at once "
                    "(array_parallelism)")
            if f.name == "slurm_extra":
                value = _slurm_extra(value, key, t.source)
            changes[f.name] = value
        return replace(base, **changes)


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


def _check_stage(r: Resources, stage: str, source: str) -> None:
    """Combinations that no single key can refuse on its own."""
    where = f"{source}: resources.{stage}"
    if r.gpu_type and not r.gpus_per_node:
        raise BrainhpcError(f"{where}: gpu_type = {r.gpu_type!r} needs gpus_per_node >= 1")
    if r.cells_per_task > 1 and r.tasks > 1:
        raise BrainhpcError(f"{where}: cells_per_task = {r.cells_per_task} packs small "
                            f"one-task cells; these cells run {r.tasks} DDP tasks each. Set "
                            "cells_per_task = 1 or one task per cell")


@dataclass(frozen=True)
class DataSpec:
    """The prepare stage: a raw image folder or phantom slices, at ``size`` px."""

    path: Path | None = None
    phantom: int | None = None
    size: int = 128
    seed: int = 0
    labels: str | None = None  # for layouts that are not auto-detected (see brainhpc prepare)


@dataclass(frozen=True)
class GenerateSpec:
    """archs x labels generator cells; ``options`` maps an arch to its architecture options."""

    archs: tuple[str, ...]
    labels: tuple[str, ...] = ("healthy", "tumour")
    seed: int = 0
    epochs: int | None = None
    n_samples: int = 1500
    batch_size: int | None = None
    min_images: int = 64
    quality: bool = True
    feature_steps: int | None = None
    checkpoint_every: int = 500
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ClassifyBlock:
    """model x train_data x techniques x seeds classifier cells."""

    model: str
    train_data: tuple[str, ...]
    techniques: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None
    batch_size: int | None = None
    options: dict = field(default_factory=dict)  # further ClassifyConfig fields


@dataclass(frozen=True)
class Sweep:
    name: str
    source: Path
    data: DataSpec
    generate: GenerateSpec | None
    classify: tuple[ClassifyBlock, ...]
    resources: dict  # stage -> Resources (partition, GPUs and tasks already resolved per stage)
    setup: tuple[str, ...] = ()
    container: str = ""  # prefix template ({binds}, {volumes}); "" = the host's python
    container_binds: tuple[str, ...] = ()  # more paths to bind besides run, data and cache
    profile: str = ""  # the profile's name as given; "" when none was named (local defaults)
    cluster: str = ""  # the ClusterName the profile was written for ("" = any)

    def device(self, stage: str) -> str:
        """What a SLURM cell of ``stage`` runs on: cuda exactly when GPUs were requested."""
        return "cuda" if self.resources[stage].gpus_per_node else "cpu"


def _read_profile(ref: str, source: str) -> dict:
    path = Path(ref) if ref.endswith(".toml") else PROFILES / f"{ref}.toml"
    if not path.is_absolute() and ref.endswith(".toml"):
        path = Path(source).parent / path
    if not path.exists():
        have = ", ".join(sorted(p.stem for p in PROFILES.glob("*.toml")))
        raise BrainhpcError(f"{source}: profile {ref!r} not found ({path}); profiles in "
                            f"{PROFILES}: {have}, or give a path to a .toml file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BrainhpcError(f"{path}: not valid TOML ({e})") from e


def _check_prefix(prefix: str, key: str, source: str) -> str:
    for name in re.findall(r"(?<!\$)\{([^{}]*)\}", prefix):
        if name not in PLACEHOLDERS:
            raise BrainhpcError(f"{source}: {key}: unknown placeholder {{{name}}}; valid: "
                                f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (shell "
                                "variables are written ${VAR})")
    return prefix


def _read_data(t: _Table, data_override: Path | None) -> DataSpec:
    path = t.get("path", str)
    phantom = t.get("phantom", int)
    size = _positive(t.get("size", int, 128), t.key("size"), t.source)
    seed = t.get("seed", int, 0)
    labels = t.get("labels", str)
    t.done()
    if data_override is not None:
        path, phantom = str(data_override), None
    if (path is None) == (phantom is None):
        raise BrainhpcError(f"{t.source}: [data] needs exactly one of path or phantom "
                            "(or pass --data PATH)")
    if path is not None:
        path = Path(path).expanduser().resolve()
        if not path.is_dir():
            raise BrainhpcError(f"{t.source}: data.path {path} is not a folder (relative paths "
                                "are taken from the current directory; override with --data)")
    _positive(phantom, t.key("phantom"), t.source)
    return DataSpec(path=path, phantom=phantom, size=size, seed=seed, labels=labels)


def _read_generate(t: _Table) -> GenerateSpec:
    archs = tuple(t.strings("archs", required=True))
    for arch in archs:
        if arch not in models.ARCHS:
            raise BrainhpcError(f"{t.source}: generate.archs: unknown generator {arch!r}; "
                                f"valid: {', '.join(models.ARCHS)}")
    labels = tuple({"tumor": "tumour"}.get(x, x) for x in t.strings("labels", ["healthy",
                                                                               "tumour"]))
    for label in labels:
        if label not in LABELS:
            raise BrainhpcError(f"{t.source}: generate.labels: unknown label {label!r}; "
                                f"valid: {', '.join(LABELS)}")
    spec = {}
    for key in ("seed", "epochs", "n_samples", "batch_size", "min_images", "feature_steps",
                "checkpoint_every"):
        value = t.get(key, int)
        if value is not None:
            spec[key] = _positive(value, t.key(key), t.source, zero_ok=key == "seed")
    quality = t.get("quality", bool, True)
    opts = t.table("options")
    options = {}
    for arch in list(opts.data):
        if arch not in archs:
            raise BrainhpcError(f"{t.source}: generate.options.{arch}: {arch!r} is not in "
                                f"generate.archs ({', '.join(archs)})")
        options[arch] = opts.get(arch, dict)
    opts.done()
    t.done()
    return GenerateSpec(archs=archs, labels=labels, quality=quality, options=options, **spec)


def _read_block(t: _Table, defaults: dict, generators: tuple[str, ...]) -> ClassifyBlock:
    model = t.get("model", str, required=True)
    if model not in CLASSIFY_MODELS:
        raise BrainhpcError(f"{t.source}: {t.key('model')}: unknown model {model!r}; valid: "
                            f"{', '.join(CLASSIFY_MODELS)}")
    train = tuple(t.strings("train_data", required=True))
    for text in train:
        spec = parse_train_spec(text)
        if spec.generator is not None and spec.generator not in generators:
            raise BrainhpcError(f"{t.source}: {t.key('train_data')}: {text!r} needs generator "
                                f"{spec.generator!r}, which generate.archs does not list "
                                f"({', '.join(generators) or 'no generate stage'})")
    techniques = tuple(t.strings("techniques", []))
    if model == "vae" and not techniques:
        raise BrainhpcError(f"{t.source}: {t.key('techniques')}: the vae classifier needs "
                            f"techniques; valid: {', '.join(TECHNIQUES)}")
    if model == "cnn" and techniques:
        raise BrainhpcError(f"{t.source}: {t.key('techniques')}: the cnn takes no technique "
                            f"(techniques are for model = \"vae\")")
    for tech in techniques:
        if tech not in TECHNIQUES:
            raise BrainhpcError(f"{t.source}: {t.key('techniques')}: unknown technique "
                                f"{tech!r}; valid: {', '.join(TECHNIQUES)}")
    seeds = t.get("seeds", list, defaults.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise BrainhpcError(f"{t.source}: {t.key('seeds')} must be a non-empty list of "
                            f"integers, got {seeds!r}")
    epochs = _positive(t.get("epochs", int, defaults.get("epochs")), t.key("epochs"), t.source)
    batch = _positive(t.get("batch_size", int, defaults.get("batch_size")),
                      t.key("batch_size"), t.source)
    options = {**defaults.get("options", {}), **t.get("options", dict, {})}
    t.done()
    return ClassifyBlock(model=model, train_data=train, techniques=techniques,
                         seeds=tuple(seeds), epochs=epochs, batch_size=batch, options=options)


def _stage_tables(res: _Table) -> dict[str, _Table]:
    return {s: _Table(res.get(s, dict, {}), res.key(s), res.source) for s in STAGES}


def load_sweep(path: str | Path, data: Path | None = None, partition: str | None = None,
               profile: str | None = None, cpu_partition: str | None = None) -> Sweep:
    """Read and validate a sweep file; the keyword arguments override the file and profile."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        have = ", ".join(sorted(p.name for p in JOBS.glob("*.toml")))
        raise BrainhpcError(f"sweep file {path} does not exist (sweep files in "
                            f"{JOBS}: {have})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BrainhpcError(f"{path}: not valid TOML ({e})") from e
    top = _Table(raw, "", source)
    name = top.get("name", str, path.stem)
    named = top.get("profile", str, "")
    named = profile or named
    profile_ref = named or "local"
    prof = _Table(_read_profile(profile_ref, source), "", f"profile {profile_ref}")
    prof.get("name", str)
    cluster = prof.get("cluster", str, "")
    setup = prof.strings("setup", [])
    prof_res = prof.table("resources")
    prof_stages = _stage_tables(prof_res)
    prof_common = Resources.read(prof_res, Resources())
    container = prof.table("container")
    prefix = _check_prefix(container.get("prefix", str, ""), "container.prefix", prof.source)
    binds = container.strings("binds", [])
    container.done()
    prof.done()

    data_spec = _read_data(top.table("data"), data)
    gen = _read_generate(top.table("generate")) if "generate" in raw else None
    top.seen.add("generate")
    cls = top.table("classify")
    defaults = {"seeds": cls.get("seeds", list, [0]), "epochs": cls.get("epochs", int),
                "batch_size": cls.get("batch_size", int), "options": cls.get("options", dict, {})}
    blocks = cls.get("cells", list, [])
    generators = gen.archs if gen else ()
    classify = tuple(_read_block(_Table(b, f"classify.cells[{i}]", source), defaults, generators)
                     for i, b in enumerate(blocks))
    cls.done()

    res = top.table("resources")
    stages = _stage_tables(res)
    resources = {}
    for stage, kind in STAGE_TABLE.items():
        r = prof_common
        for t in (prof_stages[stage], res, stages[stage]):
            r = Resources.read(t, r)
            if t is not res and not kind.gpu and "partition" in t.data:
                r = replace(r, cpu_partition=r.partition)  # a CPU stage's own partition
        if partition:
            r = replace(r, partition=partition)
        if cpu_partition:
            r = replace(r, cpu_partition=cpu_partition)
        if not kind.gpu:  # one task, no GPU, on the CPU partition
            r = replace(r, partition=r.cpu_partition or r.partition, gpus_per_node=0,
                        gpu_type="", tasks_per_node=1)
        _check_stage(r, stage, source)
        resources[stage] = r
    for t in (*prof_stages.values(), prof_res, *stages.values(), res):
        t.done()
    cont = top.table("container")
    prefix = _check_prefix(cont.get("prefix", str, prefix), "container.prefix", source)
    binds = cont.strings("binds", binds)
    cont.done()
    setup = top.strings("setup", setup)
    top.done()
    return Sweep(name=name, source=path.resolve(), data=data_spec, generate=gen,
                 classify=classify, resources=resources, setup=tuple(setup), container=prefix,
                 container_binds=tuple(binds), profile=named, cluster=cluster)
