"""Sweep files (jobs/*.toml) and site profiles -> typed, validated ``Sweep`` objects.

A sweep file names the data, the cells of each stage and, optionally, resources for this study;
a site profile (``slurm/profiles/<name>.toml``) holds what differs between clusters (partitions,
GPUs per cell, site knobs, setup lines, container prefix; ``brainhpc.sweep.resources``). Every
key is checked before anything is submitted: an unknown key or a wrong type raises
``BrainhpcError`` naming the file and the key; a value out of bounds is refused by the stage
config it is for (``brainhpc.options``), which the plan builds for every cell. A key left out
takes that config's default. The stages themselves are listed in ``brainhpc.stages``. Layout::

    name = "smoke"
    profile = "local"              # slurm/profiles/local.toml, or a path to a profile file
    run_dir = "~/brainhpc-runs/x"  # optional; default runs/<name>; --run-dir overrides it
    [data]                         # one dataset ("data"): exactly one of path / phantom
    path = "~/data/mri/Training"   # relative paths: from the directory you run the sweep in
    phantom = 200
    size = 64
    folds = 5                      # optional: grouped 5-fold cross-validation, a cell axis (every
                                   # cell of the dataset once per fold, ids "f<i>/<id>")
    #   or several datasets, one sub-table each (cell ids then start with "<name>/"):
    # [data.br35h]
    # path = "~/data/br35h"
    # [data.lgg]
    # phantom = 200
    [generate]                     # archs x labels cells (optional stage)
    archs = ["vae", "dcgan"]
    datasets = ["lgg"]             # on these datasets only (default: all; also in every block)
    with_masks = ["lgg"]           # tumour cells of these datasets draw masks too (or true: all)
    arch_datasets = { dcgan = ["lgg"] }    # an arch on some of those datasets only
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
    [[evaluate]]                   # another dataset of this sweep as an external set:
    name = "lgg"                   # dataset = "lgg" means lgg's raw folder (its path, or what
    dataset = "lgg"                # --data lgg=PATH says; its labels unless labels is given),
    datasets = ["br35h"]           # so the entry follows --data instead of a second path
    [[<stage>.cells]]              # any other stage of the table: fields of its config,
    name = "x"                     # one cell per seed (cell ids x-s0, x-s1), on all datasets
    seeds = [0, 1]
    [resources]                    # every stage (over the profile's); [resources.<stage>] one stage
    [container]
    prefix = "apptainer exec --nv --bind {binds} IMAGE"

An [[evaluate]] entry takes exactly one of ``path``, ``dataset`` or ``phantom``.
``--evaluate NAME=PATH`` (``load_sweep(evaluate=...)``) points the entry named NAME at PATH
instead, whichever it had: for external sets that are no dataset of the sweep
(brain-tumor-mri), as ``--data`` does for the datasets.

Resources, lowest to highest precedence: ``Resources()`` defaults, the profile's ``[resources]``,
the profile's ``[resources.<stage>]``, the sweep file's ``[resources]``, its
``[resources.<stage>]``, then ``--partition`` / ``--cpu-partition`` (``load_resources``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from brainhpc import models, stages
from brainhpc.anomaly import TECHNIQUES
from brainhpc.data.layouts import parse_labels
from brainhpc.data.phantom import LESIONS
from brainhpc.data.shards import EVAL_SPLITS, LABELS
from brainhpc.data.training import parse_train_spec
from brainhpc.errors import BrainhpcError
from brainhpc.models.classifiers import CLASSIFIERS
from brainhpc.sweep.resources import (
    JOBS,
    Site,
    Table,
    check_prefix,
    load_resources,
    read_toml,
)

SINGLE = "data"  # the name of the one dataset of a plain [data] table
# dataset and [[evaluate]] names become folder names, cell ids and CSV column prefixes
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# segmentation.csv's empty_/intensity_dice_patient are baselines, not external sets
RESERVED_EVALUATE_NAMES = frozenset({"empty", "intensity"})
# stages whose sweep tables have a syntax of their own (below); every other stage of the stage
# table reads generic [[<stage>.cells]] blocks (StageBlock)
OWN_SYNTAX = ("prepare", "generate", "classify", "segment", "evaluate", "aggregate")
@dataclass(frozen=True)
class DataSpec:
    """The prepare stage of one dataset: a raw image folder or phantom slices, at ``size`` px."""

    path: Path | None = None
    phantom: int | None = None
    size: int | None = None  # None, here and below: the stage config's default
    seed: int | None = None
    labels: str | None = None  # for layouts that are not auto-detected (see brainhpc prepare)
    name: str = SINGLE  # [data.<name>]; "data" for a plain [data]
    phantom_lesions: str | None = None  # phantom only: how visible the lesions are
    folds: int | None = None  # grouped K-fold cross-validation: every cell once per fold


@dataclass(frozen=True)
class GenerateSpec:
    """archs x labels generator cells per dataset; ``options`` maps an arch to its options."""

    archs: tuple[str, ...]
    labels: tuple[str, ...] = ("healthy", "tumour")
    seed: int | None = None  # None, here and below: GenerateConfig's default
    epochs: int | None = None
    steps: int | None = None  # instead of epochs; [generate.options.<arch>] steps: per arch
    n_samples: int | None = None
    batch_size: int | None = None
    min_images: int | None = None
    quality: bool | None = None
    feature_steps: int | None = None
    checkpoint_every: int | None = None
    options: dict = field(default_factory=dict)
    datasets: tuple[str, ...] = (SINGLE,)
    with_masks: tuple[str, ...] = ()  # datasets whose tumour generators draw masks too
    folds: tuple[int, ...] | None = None  # with a dataset's folds: these only (None: all)
    arch_datasets: dict = field(default_factory=dict)  # arch -> its datasets (default: all)

    def runs(self, arch: str, dataset: str) -> bool:
        """Does ``arch`` have generator cells on ``dataset``?"""
        return arch in self.archs and dataset in self.arch_datasets.get(arch, self.datasets)


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
    folds: tuple[int, ...] | None = None  # with a dataset's folds: these only (None: all)


@dataclass(frozen=True)
class SegmentBlock:
    """train_data x seeds U-Net cells, on each of ``datasets`` (which need tumour masks)."""

    train_data: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None
    batch_size: int | None = None
    options: dict = field(default_factory=dict)  # further SegmentConfig fields
    datasets: tuple[str, ...] = (SINGLE,)
    folds: tuple[int, ...] | None = None  # with a dataset's folds: these only (None: all)


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
    seed: int | None = None  # this seed (EvaluateConfig's default: not the run's phantom seed)

    @property
    def prepared(self) -> bool:
        return self.path is not None and (self.path / "manifest.json").exists()


@dataclass(frozen=True)
class StageBlock:
    """``[[<stage>.cells]]`` of a stage without a syntax of its own: fields of its config
    (``options``), one cell per seed (none: one cell), on each of ``datasets``; cell ids
    ``<name>`` or ``<name>-s<seed>``."""

    name: str
    options: dict
    seeds: tuple[int, ...] = ()
    datasets: tuple[str, ...] = (SINGLE,)


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
    others: dict = field(default_factory=dict)  # stage -> its StageBlocks (see OWN_SYNTAX)

    def device(self, stage: str) -> str:
        """What a cell of ``stage`` runs on, on SLURM or through the local executors: cuda
        exactly when GPUs were requested."""
        return "cuda" if self.resources[stage].gpus_per_node else "cpu"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.datasets)

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


def _read_dataset(t: Table, name: str, override: Path | None) -> DataSpec:
    path = t.get("path", str)
    phantom = t.get("phantom", int)
    size = t.get("size", int)
    seed = t.get("seed", int)
    labels = t.get("labels", str)
    lesions = t.get("phantom_lesions", str)
    folds = t.get("folds", int)
    t.done()
    if lesions is not None and lesions not in LESIONS:
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
    return DataSpec(path=path, phantom=phantom, size=size, seed=seed, labels=labels, name=name,
                    phantom_lesions=lesions, folds=folds)


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


def _read_data(t: Table, data) -> tuple[tuple[DataSpec, ...], bool]:
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


def _datasets(t: Table, names: tuple[str, ...]) -> tuple[str, ...]:
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


def _read_generate(t: Table, names: tuple[str, ...]) -> GenerateSpec:
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
    spec = {key: t.get(key, int) for key in ("seed", "epochs", "steps", "n_samples", "batch_size",
                                             "min_images", "feature_steps", "checkpoint_every")}
    quality = t.get("quality", bool)
    folds = _folds(t, None)
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
    arch_datasets = _arch_datasets(t, archs, datasets)
    t.done()
    return GenerateSpec(archs=archs, labels=labels, quality=quality, options=options,
                        datasets=datasets, with_masks=tuple(n for n in datasets if n in masks),
                        folds=folds, arch_datasets=arch_datasets, **spec)


def _arch_datasets(t: Table, archs: tuple[str, ...], datasets: tuple[str, ...]) -> dict:
    """``arch_datasets = { ldm = ["lgg"] }``: an architecture on some datasets only."""
    given = t.get("arch_datasets", dict, {})
    out = {}
    for arch, names in given.items():
        if arch not in archs:
            raise BrainhpcError(f"{t.source}: generate.arch_datasets.{arch}: {arch!r} is not in "
                                f"generate.archs ({', '.join(archs)})")
        if not isinstance(names, list) or not names or \
                any(n not in datasets for n in names):
            raise BrainhpcError(f"{t.source}: generate.arch_datasets.{arch} must be a non-empty "
                                f"list of the generate stage's datasets ({', '.join(datasets)}),"
                                f" got {names!r}")
        out[arch] = tuple(n for n in datasets if n in names)
    return out


def _train_data(t: Table, gen: GenerateSpec | None, datasets: tuple[str, ...],
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
            if not gen.runs(g, ds):
                raise BrainhpcError(f"{t.source}: {t.key('train_data')}: {text!r} on dataset "
                                    f"{ds!r} needs {g} generator cells there, but "
                                    f"generate.arch_datasets.{g} is "
                                    f"{list(gen.arch_datasets[g])}; set this block's datasets")
            if masks and ds not in gen.with_masks:
                raise BrainhpcError(
                    f"{t.source}: {t.key('train_data')}: {text!r} on dataset {ds!r} trains a "
                    "segmenter on synthetic tumour images, which need masks: set "
                    f"generate.with_masks = true (or list {ds!r} in it)")
    return train


def _defaults(t: Table) -> dict:
    """The block defaults of [classify] / [segment]."""
    return {"seeds": t.get("seeds", list, [0]), "epochs": t.get("epochs", int),
            "batch_size": t.get("batch_size", int), "options": t.get("options", dict, {}),
            "folds": _folds(t, None)}


def _folds(t: Table, default: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The optional ``folds`` of a block: which folds of its datasets' cross-validation it runs
    (checked against each dataset's ``folds`` when the plan is made)."""
    folds = t.get("folds", list)
    if folds is None:
        return default
    if not folds or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0
                            for f in folds):
        raise BrainhpcError(f"{t.source}: {t.key('folds')} must be a non-empty list of fold "
                            f"numbers (0, 1, ...), got {folds!r}")
    return tuple(dict.fromkeys(folds))


def _common(t: Table, defaults: dict) -> dict:
    """seeds, epochs, batch_size and options of one block, over its table's defaults."""
    seeds = t.get("seeds", list, defaults.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise BrainhpcError(f"{t.source}: {t.key('seeds')} must be a non-empty list of "
                            f"integers, got {seeds!r}")
    epochs = t.get("epochs", int, defaults.get("epochs"))
    batch = t.get("batch_size", int, defaults.get("batch_size"))
    options = {**defaults.get("options", {}), **t.get("options", dict, {})}
    return {"seeds": tuple(seeds), "epochs": epochs, "batch_size": batch, "options": options,
            "folds": _folds(t, defaults.get("folds"))}


def _read_block(t: Table, defaults: dict, gen: GenerateSpec | None,
                names: tuple[str, ...]) -> ClassifyBlock:
    model = t.get("model", str, required=True)
    if model not in CLASSIFIERS:
        raise BrainhpcError(f"{t.source}: {t.key('model')}: unknown model {model!r}; valid: "
                            f"{', '.join(CLASSIFIERS)}")
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


def _read_segment(t: Table, defaults: dict, gen: GenerateSpec | None,
                  names: tuple[str, ...]) -> SegmentBlock:
    datasets = _datasets(t, names)
    train = _train_data(t, gen, datasets, masks=True)
    common = _common(t, defaults)
    t.done()
    return SegmentBlock(train_data=train, datasets=datasets, **common)


def _evaluate_source(t: Table, name: str, data: dict[str, DataSpec], override: Path | None
                     ) -> tuple[str | None, int | None, str | None]:
    """(path, phantom, the dataset's labels) of an entry: ``--evaluate NAME=PATH`` first, else
    ``dataset`` (that dataset's raw folder, after ``--data``), else its own path or phantom.
    Following the dataset is what lets one ``--data lgg=PATH`` move both uses of a folder."""
    raw_path, phantom, dataset = t.get("path", str), t.get("phantom", int), t.get("dataset", str)
    given = [k for k, v in (("path", raw_path), ("dataset", dataset), ("phantom", phantom))
             if v is not None]
    if len(given) != 1:
        got = f" (got {' and '.join(given)})" if given else ""
        raise BrainhpcError(f"{t.source}: {t.key(given[-1] if given else 'path')}: an "
                            "[[evaluate]] entry needs exactly one of path (a raw image folder or "
                            "a prepared dataset), dataset (a dataset of this sweep: its raw "
                            f"folder) or phantom (a number of fresh phantom slices){got}")
    if override is not None:
        if phantom is not None:
            raise BrainhpcError(f"--evaluate {name}={override}: [[evaluate]] {name!r} of "
                                f"{t.source} is fresh phantom slices, it reads no folder")
        return str(override), None, None
    if dataset is None:
        return raw_path, phantom, None
    spec = data.get(dataset)
    if spec is None:
        raise BrainhpcError(f"{t.source}: {t.key('dataset')}: unknown dataset {dataset!r}; "
                            f"datasets of this sweep: {', '.join(data)}")
    if spec.path is None:
        raise BrainhpcError(f"{t.source}: {t.key('dataset')}: dataset {dataset!r} is phantom "
                            "slices, not a folder; give path, or phantom = N for fresh slices")
    return str(spec.path), None, spec.labels


def _read_evaluate(t: Table, data: dict[str, DataSpec],
                   overrides: dict[str, Path]) -> EvaluateEntry:
    name = _name(t.get("name", str, required=True), t.key("name"), t.source)
    if name in RESERVED_EVALUATE_NAMES:  # their result columns would be the baselines'
        raise BrainhpcError(f"{t.source}: {t.key('name')}: {name!r} names a baseline column of "
                            f"the results; choose another name (not one of "
                            f"{', '.join(sorted(RESERVED_EVALUATE_NAMES))})")
    raw_path, phantom, inherited = _evaluate_source(t, name, data, overrides.get(name))
    seed = t.get("seed", int)
    labels = t.strings("labels")
    split = t.get("split", str)
    datasets = _datasets(t, tuple(data))
    t.done()
    if phantom is not None:
        if labels is not None or split is not None:
            raise BrainhpcError(f"{t.source}: {t.key('phantom')}: phantom slices carry their "
                                "labels and have no splits; drop labels/split")
        return EvaluateEntry(name=name, path=None, datasets=datasets, phantom=phantom,
                             seed=seed)
    if labels is None and inherited is not None:
        labels = inherited.split()
    flag = f"; override with --evaluate {name}=PATH"
    path = _folder(raw_path, t.key("path"), t.source,
                   f"; a raw image folder or a prepared dataset{flag}")
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


def _read_file(path: Path) -> dict:
    if not path.exists():
        have = ", ".join(sorted(p.name for p in JOBS.glob("*.toml")))
        raise BrainhpcError(f"sweep file {path} does not exist (sweep files in "
                            f"{JOBS}: {have})")
    return read_toml(path)


def _read_stage_block(t: Table, stage: str, index: int, names: tuple[str, ...]) -> StageBlock:
    name = _name(t.get("name", str, f"{stage}{index}"), t.key("name"), t.source)
    seeds = t.get("seeds", list, [])
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise BrainhpcError(f"{t.source}: {t.key('seeds')} must be a list of integers, "
                            f"got {seeds!r}")
    datasets = _datasets(t, names)
    options = {k: v for k, v in t.data.items() if k not in t.seen}
    t.seen.update(options)  # the stage config checks them, cell by cell (plan.stage_config)
    t.done()
    return StageBlock(name, options, tuple(seeds), datasets)


def _read_others(top: Table, names: tuple[str, ...]) -> dict:
    """The generic cell blocks of every stage without a syntax of its own."""
    out = {}
    for stage in stages.NAMES:
        if stage in OWN_SYNTAX:
            continue
        t = top.table(stage)
        out[stage] = tuple(_read_stage_block(Table(b, f"{stage}.cells[{i}]", top.source), stage,
                                             i, names)
                           for i, b in enumerate(t.get("cells", list, [])))
        t.done()
        seen = [b.name for b in out[stage]]
        twice = sorted({n for n in seen if seen.count(n) > 1})
        if twice:
            raise BrainhpcError(f"{top.source}: {stage}.cells: two blocks are named "
                                f"{twice[0]!r}; each block's name names its cells' folders")
    return out


def _evaluate_overrides(evaluate, entries: list, source: str) -> dict[str, Path]:
    """``--evaluate NAME=PATH`` values -> {entry name: path}; NAME must name an entry."""
    items = [] if evaluate is None else [evaluate] if isinstance(evaluate, (str, Path)) \
        else list(evaluate)
    names = [e.get("name") for e in entries if isinstance(e, dict)]
    out = {}
    for item in map(str, items):
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise BrainhpcError(f"--evaluate {item}: expected NAME=PATH, NAME an [[evaluate]] "
                                f"entry of {source} ({', '.join(map(str, names)) or 'none'})")
        if name not in names:
            raise BrainhpcError(f"--evaluate {item}: {source} has no [[evaluate]] entry "
                                f"{name!r}; its entries: {', '.join(map(str, names)) or 'none'}")
        out[name] = Path(path)
    return out


def _read_cells(top: Table, raw: dict, datasets: tuple[DataSpec, ...], evaluate=None) -> dict:
    """The generate spec, the classify and segment blocks and the evaluate entries."""
    source = top.source
    names = tuple(d.name for d in datasets)
    gen = _read_generate(top.table("generate"), names) if "generate" in raw else None
    top.seen.add("generate")
    out = {"generate": gen}
    for stage, read in (("classify", _read_block), ("segment", _read_segment)):
        t = top.table(stage)
        defaults = _defaults(t)
        out[stage] = tuple(read(Table(b, f"{stage}.cells[{i}]", source), defaults, gen, names)
                           for i, b in enumerate(t.get("cells", list, [])))
        t.done()
    out["others"] = _read_others(top, names)
    entries = top.get("evaluate", list, [])
    over = _evaluate_overrides(evaluate, entries, source)
    data = {d.name: d for d in datasets}
    out["evaluate"] = tuple(_read_evaluate(Table(e, f"evaluate[{i}]", source), data, over)
                            for i, e in enumerate(entries))
    seen = [e.name for e in out["evaluate"]]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise BrainhpcError(f"{source}: evaluate: two entries are named {twice[0]!r}; each "
                            "external set needs its own name (it names folders and columns)")
    return out


def load_sweep(path: str | Path, data: Path | str | list | None = None,
               partition: str | None = None, profile: str | None = None,
               cpu_partition: str | None = None, evaluate: str | list | None = None) -> Sweep:
    """Read and validate a sweep file; the keyword arguments override the file and profile.

    ``data``: ``--data`` value(s): a PATH for the one dataset, or NAME=PATH per dataset;
    ``evaluate``: ``--evaluate NAME=PATH`` value(s), the folder of [[evaluate]] entry NAME."""
    path = Path(path)
    raw = _read_file(path)
    top = Table(raw, "", str(path))
    name = top.get("name", str, path.stem)
    run_dir = top.get("run_dir", str)
    named = top.get("profile", str, "")
    named = profile or named
    site = Site.read(named or "local", str(path))
    datasets, named_data = _read_data(top.table("data"), data)
    cells = _read_cells(top, raw, datasets, evaluate)
    resources = load_resources(site, top.table("resources"), partition, cpu_partition)
    cont = top.table("container")
    prefix = check_prefix(cont.get("prefix", str, site.prefix), "container.prefix", str(path))
    binds = cont.strings("binds", list(site.binds))
    cont.done()
    setup = top.strings("setup", list(site.setup))
    top.done()
    return Sweep(name=name, source=path.resolve(), datasets=datasets, generate=cells["generate"],
                 classify=cells["classify"], segment=cells["segment"],
                 evaluate=cells["evaluate"], named=named_data, resources=resources,
                 setup=tuple(setup), container=prefix, container_binds=tuple(binds),
                 profile=named, cluster=site.cluster, others=cells["others"],
                 run_dir=None if run_dir is None else Path(run_dir).expanduser())
