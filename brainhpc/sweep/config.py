"""Sweep files (jobs/*.toml) and site profiles -> typed, validated ``Sweep`` objects.

A sweep file names the data, the cells of each stage and, optionally, resources for this study;
a site profile (``slurm/profiles/<name>.toml``) holds what differs between clusters (partitions,
GPUs per cell, site knobs, setup lines, container prefix). Every key is checked before anything
is submitted: an unknown key or a bad value raises ``BrainhpcError`` naming the file and the key.
``STAGE_TABLE`` below is the one place that lists the stages and which of them use GPUs. Layout::

    name = "smoke"
    profile = "local"              # slurm/profiles/local.toml, or a path to a profile file
    run_dir = "~/brainhpc-runs/x"  # optional; default runs/<name>; --run-dir overrides it
    [data]                         # one dataset ("data"): exactly one of path / phantom
    path = "~/data/mri/Training"   # relative paths: from the directory you run the sweep in
    phantom = 200
    size = 64
    #   or several datasets, one sub-table each (cell ids then start with "<name>/"):
    # [data.br35h]
    # path = "~/data/br35h"
    # [data.lgg]
    # phantom = 200
    [generate]                     # archs x labels cells (optional stage)
    archs = ["vae", "dcgan"]
    datasets = ["lgg"]             # on these datasets only (default: all; also in every block)
    with_masks = ["lgg"]           # tumour cells of these datasets draw masks too (or true: all)
    [generate.options.dcgan]       # architecture options for one arch
    [classify]                     # defaults for every block below
    seeds = [0]
    [[classify.cells]]             # one block: model x train_data x techniques x seeds
    model = "vae"
    techniques = ["giaem", "dbscan"]
    train_data = ["real", "synthetic:vae"]
    [segment]                      # defaults, as [classify]
    [[segment.cells]]              # U-Net: train_data x seeds; options = SegmentConfig fields
    train_data = ["real", "mixed:vae"]
    [[evaluate]]                   # external validation: every finished model of each dataset
    name = "br35h"                 # scored on this folder (raw, or a prepared dataset)
    path = "~/data/br35h"
    labels = ["tumour=yes", "healthy=no"]   # raw folders only; split = "test": prepared only
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
from brainhpc.data.layouts import parse_labels
from brainhpc.data.phantom import LESIONS
from brainhpc.data.shards import LABELS, SPLITS
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
    "segment": Stage(gpu=True, after=("prepare", "generate")),
    "evaluate": Stage(gpu=False, after=("classify", "segment")),
    "aggregate": Stage(gpu=False, after=("prepare", "generate", "classify", "segment",
                                         "evaluate")),
}
STAGES = tuple(STAGE_TABLE)
GPU_STAGES = tuple(s for s, k in STAGE_TABLE.items() if k.gpu)
CLASSIFY_MODELS = ("cnn", "vae")
TECHNIQUES = ("giaem", "dbscan", "kmeans-single", "kmeans-global")
EVAL_SPLITS = (*SPLITS, "all")  # as brainhpc.classify.evaluate (not imported: it loads torch)
SINGLE = "data"  # the name of the one dataset of a plain [data] table
# dataset and [[evaluate]] names become folder names, cell ids and CSV column prefixes
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# segmentation.csv's empty_/intensity_dice_patient are baselines, not external sets
RESERVED_EVALUATE_NAMES = frozenset({"empty", "intensity"})
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

    partition: str = "debug"  # GPU stages (STAGE_TABLE: generate, classify, segment) run here
    cpu_partition: str = ""  # CPU stages (prepare, evaluate, aggregate) run here; "" = partition
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
            if f.type == "int":  # mem_gb (float) below: any amount > 0 (0.5 -> --mem=512M)
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
    """The prepare stage of one dataset: a raw image folder or phantom slices, at ``size`` px."""

    path: Path | None = None
    phantom: int | None = None
    size: int = 128
    seed: int = 0
    labels: str | None = None  # for layouts that are not auto-detected (see brainhpc prepare)
    name: str = SINGLE  # [data.<name>]; "data" for a plain [data]
    phantom_lesions: str = "standard"  # phantom only: how visible the lesions are


@dataclass(frozen=True)
class GenerateSpec:
    """archs x labels generator cells per dataset; ``options`` maps an arch to its options."""

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
    datasets: tuple[str, ...] = (SINGLE,)
    with_masks: tuple[str, ...] = ()  # datasets whose tumour generators draw masks too


@dataclass(frozen=True)
class ClassifyBlock:
    """model x train_data x techniques x seeds classifier cells, on each of ``datasets``."""

    model: str
    train_data: tuple[str, ...]
    techniques: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None
    batch_size: int | None = None
    options: dict = field(default_factory=dict)  # further ClassifyConfig fields
    datasets: tuple[str, ...] = (SINGLE,)


@dataclass(frozen=True)
class SegmentBlock:
    """train_data x seeds U-Net cells, on each of ``datasets`` (which need tumour masks)."""

    train_data: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None
    batch_size: int | None = None
    options: dict = field(default_factory=dict)  # further SegmentConfig fields
    datasets: tuple[str, ...] = (SINGLE,)


@dataclass(frozen=True)
class EvaluateEntry:
    """One external set: every finished classify/segment model of each of ``datasets`` is
    scored on ``path`` (a raw folder, pre-processed as prepare does, or a prepared dataset)."""

    name: str
    path: Path | None  # None: phantom slices
    labels: str | None = None  # raw folders: "tumour=yes healthy=no" (one label: one class)
    split: str | None = None  # prepared datasets: train | val | test | all (default test)
    datasets: tuple[str, ...] = (SINGLE,)
    phantom: int | None = None  # or: this many fresh phantom slices (with masks), drawn with
    seed: int = 1  # this seed (another seed than the run's phantom data: never seen in training)

    @property
    def prepared(self) -> bool:
        return self.path is not None and (self.path / "manifest.json").exists()


@dataclass(frozen=True)
class Sweep:
    name: str
    source: Path
    datasets: tuple[DataSpec, ...]
    generate: GenerateSpec | None
    classify: tuple[ClassifyBlock, ...]
    resources: dict  # stage -> Resources (partition, GPUs and tasks already resolved per stage)
    segment: tuple[SegmentBlock, ...] = ()
    evaluate: tuple[EvaluateEntry, ...] = ()
    named: bool = False  # [data.<name>] tables: cell ids and folders start with "<name>/"
    setup: tuple[str, ...] = ()
    container: str = ""  # prefix template ({binds}, {volumes}); "" = the host's python
    container_binds: tuple[str, ...] = ()  # more paths to bind besides run, data and cache
    profile: str = ""  # the profile's name as given; "" when none was named (local defaults)
    cluster: str = ""  # the ClusterName the profile was written for ("" = any)
    run_dir: Path | None = None  # the file's run_dir key (None: runs/<name>); --run-dir wins

    def device(self, stage: str) -> str:
        """What a SLURM cell of ``stage`` runs on: cuda exactly when GPUs were requested."""
        return "cuda" if self.resources[stage].gpus_per_node else "cpu"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.datasets)


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


def _folder(text: str, key: str, source: str, hint: str) -> Path:
    path = Path(text).expanduser().resolve()
    if not path.is_dir():
        raise BrainhpcError(f"{source}: {key} {path} is not a folder (relative paths are taken "
                            f"from the current directory{hint})")
    return path


def _name(name: str, key: str, source: str) -> str:
    if not NAME.match(name):
        raise BrainhpcError(f"{source}: {key}: {name!r} is not a valid name (letters, digits, "
                            "'-' and '_'; it names folders, cell ids and result columns)")
    return name


def _read_dataset(t: _Table, name: str, override: Path | None) -> DataSpec:
    path = t.get("path", str)
    phantom = t.get("phantom", int)
    size = _positive(t.get("size", int, 128), t.key("size"), t.source)
    seed = t.get("seed", int, 0)
    labels = t.get("labels", str)
    lesions = t.get("phantom_lesions", str, "standard")
    t.done()
    if lesions not in LESIONS:
        raise BrainhpcError(f"{t.source}: {t.key('phantom_lesions')}: unknown {lesions!r}; "
                            f"valid: {', '.join(LESIONS)}")
    if override is not None:
        path, phantom = str(override), None
    flag = "--data PATH" if name == SINGLE else f"--data {name}=PATH"
    if (path is None) == (phantom is None):
        raise BrainhpcError(f"{t.source}: [{t.where}] needs exactly one of path or phantom "
                            f"(or pass {flag})")
    if path is not None:
        path = _folder(path, t.key("path"), t.source, f"; override with {flag}")
    _positive(phantom, t.key("phantom"), t.source)
    return DataSpec(path=path, phantom=phantom, size=size, seed=seed, labels=labels, name=name,
                    phantom_lesions=lesions)


def _overrides(data, names: list[str], named: bool, source: str) -> dict[str, Path]:
    """``--data`` values -> {dataset: path}: PATH for the one dataset, NAME=PATH for any."""
    items = [] if data is None else list(data) if isinstance(data, (list, tuple)) else [data]
    out = {}
    for item in items:
        text = str(item)
        name, sep, path = text.partition("=")
        if named and sep and NAME.match(name):
            if name not in names:
                raise BrainhpcError(f"--data {text}: {source} has no dataset {name!r}; its "
                                    f"datasets: {', '.join(names)}")
            out[name] = Path(path)
        elif len(names) == 1:
            out[names[0]] = Path(text)
        else:
            raise BrainhpcError(f"--data {text}: {source} has {len(names)} datasets "
                                f"({', '.join(names)}); say which one: --data NAME=PATH")
    return out


def _read_data(t: _Table, data) -> tuple[tuple[DataSpec, ...], bool]:
    """A plain [data] (one dataset, "data") or [data.<name>] sub-tables; (datasets, named)."""
    subs = [k for k, v in t.data.items() if isinstance(v, dict)]
    if not subs:
        over = _overrides(data, [SINGLE], False, t.source)
        return (_read_dataset(t, SINGLE, over.get(SINGLE)),), False
    plain = sorted(set(t.data) - set(subs))
    if plain:
        raise BrainhpcError(f"{t.source}: {t.key(plain[0])} beside the dataset table(s) "
                            f"{', '.join(f'[data.{k}]' for k in subs)}: give either one plain "
                            "[data] table or one [data.<name>] table per dataset")
    over = _overrides(data, subs, True, t.source)
    out = tuple(_read_dataset(t.table(_name(k, t.key(k), t.source)), k, over.get(k))
                for k in subs)
    return out, True


def _datasets(t: _Table, names: tuple[str, ...]) -> tuple[str, ...]:
    """The optional ``datasets`` filter of a table, in the sweep's dataset order."""
    chosen = t.strings("datasets", list(names))
    for n in chosen:
        if n not in names:
            raise BrainhpcError(f"{t.source}: {t.key('datasets')}: unknown dataset {n!r}; "
                                f"datasets of this sweep: {', '.join(names)}")
    if not chosen:
        raise BrainhpcError(f"{t.source}: {t.key('datasets')} is empty; name at least one of "
                            f"{', '.join(names)} (or leave it out: all)")
    return tuple(n for n in names if n in chosen)


def _read_generate(t: _Table, names: tuple[str, ...]) -> GenerateSpec:
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
    datasets = _datasets(t, names)
    masks = t.get("with_masks", (bool, list), False)
    masks = list(datasets) if masks is True else [] if masks is False else masks
    for n in masks:
        if n not in datasets:
            raise BrainhpcError(f"{t.source}: generate.with_masks: {n!r} is not a dataset the "
                                f"generate stage runs on ({', '.join(datasets)})")
    if masks and "tumour" not in labels:
        raise BrainhpcError(f"{t.source}: generate.with_masks draws tumour masks, but "
                            f"generate.labels ({', '.join(labels)}) has no tumour")
    opts = t.table("options")
    options = {}
    for arch in list(opts.data):
        if arch not in archs:
            raise BrainhpcError(f"{t.source}: generate.options.{arch}: {arch!r} is not in "
                                f"generate.archs ({', '.join(archs)})")
        options[arch] = opts.get(arch, dict)
    opts.done()
    t.done()
    return GenerateSpec(archs=archs, labels=labels, quality=quality, options=options,
                        datasets=datasets, with_masks=tuple(n for n in datasets if n in masks),
                        **spec)


def _train_data(t: _Table, gen: GenerateSpec | None, datasets: tuple[str, ...],
                masks: bool = False) -> tuple[str, ...]:
    """``train_data`` of a block; each synthetic part needs its generator on every dataset of the
    block (and, for ``masks``: segmentation, tumour masks from it)."""
    train = tuple(t.strings("train_data", required=True))
    generators = gen.archs if gen else ()
    for text in train:
        g = parse_train_spec(text).generator
        if g is None:
            continue
        if g not in generators:
            raise BrainhpcError(f"{t.source}: {t.key('train_data')}: {text!r} needs generator "
                                f"{g!r}, which generate.archs does not list "
                                f"({', '.join(generators) or 'no generate stage'})")
        for ds in datasets:
            if ds not in gen.datasets:
                raise BrainhpcError(f"{t.source}: {t.key('train_data')}: {text!r} on dataset "
                                    f"{ds!r} needs generate cells there, but generate.datasets "
                                    f"is {list(gen.datasets)}")
            if masks and ds not in gen.with_masks:
                raise BrainhpcError(
                    f"{t.source}: {t.key('train_data')}: {text!r} on dataset {ds!r} trains a "
                    "segmenter on synthetic tumour images, which need masks: set "
                    f"generate.with_masks = true (or list {ds!r} in it)")
    return train


def _defaults(t: _Table) -> dict:
    """The block defaults of [classify] / [segment]."""
    return {"seeds": t.get("seeds", list, [0]),
            "epochs": _positive(t.get("epochs", int), t.key("epochs"), t.source),
            "batch_size": _positive(t.get("batch_size", int), t.key("batch_size"), t.source),
            "options": t.get("options", dict, {})}


def _common(t: _Table, defaults: dict) -> dict:
    """seeds, epochs, batch_size and options of one block, over its table's defaults."""
    seeds = t.get("seeds", list, defaults.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise BrainhpcError(f"{t.source}: {t.key('seeds')} must be a non-empty list of "
                            f"integers, got {seeds!r}")
    epochs = _positive(t.get("epochs", int, defaults.get("epochs")), t.key("epochs"), t.source)
    batch = _positive(t.get("batch_size", int, defaults.get("batch_size")),
                      t.key("batch_size"), t.source)
    options = {**defaults.get("options", {}), **t.get("options", dict, {})}
    return {"seeds": tuple(seeds), "epochs": epochs, "batch_size": batch, "options": options}


def _read_block(t: _Table, defaults: dict, gen: GenerateSpec | None,
                names: tuple[str, ...]) -> ClassifyBlock:
    model = t.get("model", str, required=True)
    if model not in CLASSIFY_MODELS:
        raise BrainhpcError(f"{t.source}: {t.key('model')}: unknown model {model!r}; valid: "
                            f"{', '.join(CLASSIFY_MODELS)}")
    datasets = _datasets(t, names)
    train = _train_data(t, gen, datasets)
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
    common = _common(t, defaults)
    t.done()
    return ClassifyBlock(model=model, train_data=train, techniques=techniques,
                         datasets=datasets, **common)


def _read_segment(t: _Table, defaults: dict, gen: GenerateSpec | None,
                  names: tuple[str, ...]) -> SegmentBlock:
    datasets = _datasets(t, names)
    train = _train_data(t, gen, datasets, masks=True)
    common = _common(t, defaults)
    t.done()
    return SegmentBlock(train_data=train, datasets=datasets, **common)


def _read_evaluate(t: _Table, names: tuple[str, ...]) -> EvaluateEntry:
    name = _name(t.get("name", str, required=True), t.key("name"), t.source)
    if name in RESERVED_EVALUATE_NAMES:  # their result columns would be the baselines'
        raise BrainhpcError(f"{t.source}: {t.key('name')}: {name!r} names a baseline column of "
                            f"the results; choose another name (not one of "
                            f"{', '.join(sorted(RESERVED_EVALUATE_NAMES))})")
    raw_path, phantom = t.get("path", str), t.get("phantom", int)
    seed = t.get("seed", int, 1)
    labels = t.strings("labels")
    split = t.get("split", str)
    datasets = _datasets(t, names)
    t.done()
    if (raw_path is None) == (phantom is None):
        raise BrainhpcError(f"{t.source}: {t.key('path')}: an [[evaluate]] entry needs exactly "
                            "one of path (a raw image folder or a prepared dataset) or phantom "
                            "(a number of fresh phantom slices)")
    if phantom is not None:
        _positive(phantom, t.key("phantom"), t.source)
        if labels is not None or split is not None:
            raise BrainhpcError(f"{t.source}: {t.key('phantom')}: phantom slices carry their "
                                "labels and have no splits; drop labels/split")
        return EvaluateEntry(name=name, path=None, datasets=datasets, phantom=phantom,
                             seed=seed)
    path = _folder(raw_path, t.key("path"), t.source, "; a raw image folder or a prepared dataset")
    entry = EvaluateEntry(name=name, path=path, datasets=datasets)
    if entry.prepared:
        if labels is not None:
            raise BrainhpcError(f"{t.source}: {t.key('labels')}: {path} is a prepared dataset "
                                "(manifest.json): its labels are stored; labels are for raw "
                                "image folders")
        split = split or "test"
        if split not in EVAL_SPLITS:
            raise BrainhpcError(f"{t.source}: {t.key('split')}: unknown split {split!r}; "
                                f"valid: {', '.join(EVAL_SPLITS)}")
        return replace(entry, split=split)
    if split is not None:
        raise BrainhpcError(f"{t.source}: {t.key('split')}: {path} is a raw image folder (no "
                            "manifest.json): it is scored whole; split is for prepared datasets")
    if labels is not None:
        try:
            parse_labels(labels, one_class=True)
        except BrainhpcError as e:
            raise BrainhpcError(f"{t.source}: {t.key('labels')}: {e}") from None
        labels = " ".join(labels)
    return replace(entry, labels=labels)


def _stage_tables(res: _Table) -> dict[str, _Table]:
    return {s: _Table(res.get(s, dict, {}), res.key(s), res.source) for s in STAGES}


def load_sweep(path: str | Path, data: Path | str | list | None = None,
               partition: str | None = None, profile: str | None = None,
               cpu_partition: str | None = None) -> Sweep:
    """Read and validate a sweep file; the keyword arguments override the file and profile.

    ``data``: ``--data`` value(s): a PATH for the one dataset, or NAME=PATH per dataset."""
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
    run_dir = top.get("run_dir", str)
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

    datasets, named_data = _read_data(top.table("data"), data)
    names = tuple(d.name for d in datasets)
    gen = _read_generate(top.table("generate"), names) if "generate" in raw else None
    top.seen.add("generate")
    blocks = {}
    for stage, read in (("classify", _read_block), ("segment", _read_segment)):
        t = top.table(stage)
        defaults = _defaults(t)
        blocks[stage] = tuple(read(_Table(b, f"{stage}.cells[{i}]", source), defaults, gen,
                                   names) for i, b in enumerate(t.get("cells", list, [])))
        t.done()
    evaluate = tuple(_read_evaluate(_Table(e, f"evaluate[{i}]", source), names)
                     for i, e in enumerate(top.get("evaluate", list, [])))
    seen = [e.name for e in evaluate]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise BrainhpcError(f"{source}: evaluate: two entries are named {twice[0]!r}; each "
                            "external set needs its own name (it names folders and columns)")

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
    return Sweep(name=name, source=path.resolve(), datasets=datasets, generate=gen,
                 classify=blocks["classify"], segment=blocks["segment"], evaluate=evaluate,
                 named=named_data, resources=resources, setup=tuple(setup), container=prefix,
                 container_binds=tuple(binds), profile=named, cluster=cluster,
                 run_dir=None if run_dir is None else Path(run_dir).expanduser())
