"""The plan of a sweep: every cell of every stage, with stable ids, and the config each one runs.

A cell is one stage function (``brainhpc.stages``) on one typed config, writing into
``RUN_DIR/<stage>/<cell-id>/``. Cell ids are stable (built from the cell's parameters, never from
its position), so a re-run finds its own work. ``expand`` builds the config of every cell, so a
bad value anywhere fails here, in ``--dry-run``, before anything is submitted.

Layout, chosen so the stages find each other's outputs::

    RUN_DIR/prepare/data/prepared/       the prepared dataset (PrepareConfig.out)
    RUN_DIR/generate/<arch>-<label>/     GenerateConfig.out; RUN_DIR/generate is classify's and
                                         segment's synthetic_dir (brainhpc.data.training layout)
    RUN_DIR/classify/<model>-<train data>-s<seed>/   (a vae cell scores all its techniques)
    RUN_DIR/segment/unet-<train data>-s<seed>/
    RUN_DIR/evaluate/<entry>/            an [[evaluate]] entry: summary.json, and the scores of
                                         each finished model in <stage>/<model cell id>/
    RUN_DIR/aggregate/results/           -> RUN_DIR/results/ (metrics.csv, table.md, plots)

With several datasets (``[data.<name>]``) the prepare cell of dataset <name> is ``<name>``
(``RUN_DIR/prepare/<name>/prepared``) and every other cell id starts with ``<name>/``
(``RUN_DIR/classify/<name>/cnn-real-s0``; synthetic_dir ``RUN_DIR/generate/<name>``); those
cells carry ``params["dataset"]``. A cell's params hold only what the sweep file sets: every
other value is the stage config's default (``brainhpc.options``), written in one place.

Folds (``folds = K`` in a dataset's table) are a cell axis like seeds: the dataset is prepared
once per fold (``RUN_DIR/prepare/<name>/f<i>/prepared``, ``brainhpc prepare --folds K --fold i``)
and every generate, classify, segment cell of it runs once per fold on that fold's data, with
``f<i>/`` after the dataset prefix (``RUN_DIR/classify/lgg/f2/cnn-real-s0``; synthetic_dir
``RUN_DIR/generate/lgg/f2``: a fold's generators see its training part only); those cells carry
``params["fold"]``. Evaluate cells score the models of every fold.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from brainhpc import stages
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash
from brainhpc.sweep.config import SINGLE, Sweep


@dataclass(frozen=True)
class Cell:
    """One unit of work: ``params`` are the stage config's fields other than the paths."""

    stage: str
    id: str
    params: dict
    run_dir: str

    @property
    def folder(self) -> Path:
        return Path(self.run_dir) / self.stage / self.id

    @property
    def hash(self) -> str:
        return config_hash({"stage": self.stage, "id": self.id, "params": self.params})

    @property
    def marker(self) -> Path:
        return self.folder / "cell.json"


def dataset_of(cell: Cell) -> str:
    """The dataset a cell belongs to ("data" for a plain [data] table)."""
    return cell.params.get("dataset") or SINGLE


def _fold(fold: int | None) -> str:
    return "" if fold is None else f"f{fold}"


def prepared_dir(run_dir: str | Path, dataset: str = SINGLE, fold: int | None = None) -> Path:
    return Path(run_dir) / "prepare" / dataset / _fold(fold) / "prepared"


def synthetic_dir(run_dir: str | Path, dataset: str | None = None,
                  fold: int | None = None) -> Path:
    """The folder of a dataset's (fold's) generate cells (``<arch>-<label>/``)."""
    return Path(run_dir) / "generate" / (dataset or "") / _fold(fold)


def results_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "results"


def _set(**values) -> dict:
    """The values the sweep file set (None: left to the stage config's default)."""
    return {k: v for k, v in values.items() if v is not None}


def _train_id(text: str) -> str:
    return text.replace(":", "_")


class _Plan:
    """Cells being collected, per stage; ``add`` names a dataset's cells after it."""

    def __init__(self, sweep: Sweep, run_dir: str):
        self.sweep, self.run_dir = sweep, run_dir
        self.cells: dict[str, list[Cell]] = {s: [] for s in stages.NAMES}
        self.folds = {d.name: d.folds for d in sweep.datasets}

    def add(self, stage: str, ds: str, base: str, params: dict, folded: bool = True,
            only: tuple[int, ...] | None = None) -> None:
        """One cell, or with folds (``folded``) one per fold of the dataset (``only``: these)."""
        folds = self.folds.get(ds) if folded else None
        if only is not None and not folds:
            raise BrainhpcError(f"{self.sweep.source}: {stage} {base}: folds = {list(only)} on "
                                f"dataset {ds!r}, which has no folds (set folds = K in its "
                                "data table)")
        if only is not None and max(only) >= folds:
            raise BrainhpcError(f"{self.sweep.source}: {stage} {base}: fold {max(only)} on "
                                f"dataset {ds!r}, which has folds 0..{folds - 1}")
        for fold in (only or range(folds)) if folds else (None,):
            cid = base if fold is None else f"{_fold(fold)}/{base}"
            extra = {} if fold is None else {"fold": fold}
            if self.sweep.named:
                cid, extra = f"{ds}/{cid}", {**extra, "dataset": ds}
            self.cells[stage].append(Cell(stage, cid, {**params, **extra}, self.run_dir))


def _prepare_cells(plan: _Plan) -> None:
    for d in plan.sweep.datasets:
        params = _set(data=None if d.path is None else str(d.path), phantom=d.phantom,
                      size=d.size, seed=d.seed, labels=d.labels,
                      phantom_lesions=d.phantom_lesions)
        if plan.sweep.named:
            params["dataset"] = d.name
        for fold in range(d.folds) if d.folds else (None,):
            cid, extra = d.name, {}
            if fold is not None:
                cid, extra = f"{d.name}/{_fold(fold)}", {"folds": d.folds, "fold": fold}
            plan.cells["prepare"].append(Cell("prepare", cid, {**params, **extra},
                                              plan.run_dir))


def _generate_cells(plan: _Plan) -> None:
    g = plan.sweep.generate
    for ds in g.datasets if g is not None else ():
        for arch in (a for a in g.archs if g.runs(a, ds)):
            for label in g.labels:
                params = {"arch": arch, "label": label, **_set(
                    seed=g.seed, epochs=g.epochs, steps=g.steps, n_samples=g.n_samples,
                    batch_size=g.batch_size,
                    min_images=g.min_images, quality=g.quality,
                    checkpoint_every=g.checkpoint_every, feature_steps=g.feature_steps)}
                options = dict(g.options.get(arch, {}))
                if "steps" in options:  # a generate setting, sized per architecture; it
                    params.pop("epochs", None)  # (like epochs there) beats the stage-wide one
                    params["steps"] = options.pop("steps")
                elif "epochs" in options:
                    params.pop("steps", None)
                if options:
                    params["options"] = options
                if label == "tumour" and ds in g.with_masks:
                    params["with_masks"] = True
                plan.add("generate", ds, f"{arch}-{label}", params, only=g.folds)


def _block_cells(stage: str, blocks, ds: str, source) -> dict[str, tuple[int, dict]]:
    """cell id -> (first block, params) of one dataset's classify or segment blocks. Two blocks
    naming one cell must agree (folds included); VAE cells of two blocks score the techniques
    of both."""
    by_id: dict[str, tuple[int, dict]] = {}
    for i, block in enumerate(blocks):
        if ds not in block.datasets:
            continue
        for train in block.train_data:
            for seed in block.seeds:
                model = getattr(block, "model", "unet")
                cid = f"{model}-{_train_id(train)}-s{seed}"
                params = {**({"model": model} if stage == "classify" else {}),
                          "train_data": train, "seed": seed, **block.options,
                          **_set(epochs=block.epochs, batch_size=block.batch_size,
                                 _folds=block.folds)}
                if model == "vae":
                    params["techniques"] = list(block.techniques)
                if cid not in by_id:
                    by_id[cid] = (i, params)
                    continue
                first, old = by_id[cid]
                settings = [{k: v for k, v in p.items() if k != "techniques"}
                            for p in (old, params)]
                if settings[0] != settings[1]:
                    raise BrainhpcError(f"{source}: {stage}.cells[{first}] and {stage}.cells[{i}]"
                                        f" both make cell {cid} of dataset {ds}, with different "
                                        "settings")
                if model == "vae":  # one training, the techniques of both
                    old["techniques"] += [t for t in block.techniques
                                          if t not in old["techniques"]]
    return by_id


def _model_cells(plan: _Plan) -> None:
    for ds in plan.sweep.names:
        for stage in ("classify", "segment"):
            blocks = getattr(plan.sweep, stage)
            for cid, (_, params) in _block_cells(stage, blocks, ds, plan.sweep.source).items():
                only = params.pop("_folds", None)
                plan.add(stage, ds, cid, params, only=only)


def _evaluate_cells(plan: _Plan) -> None:
    sweep = plan.sweep
    models = {dataset_of(c) for s in ("classify", "segment") for c in plan.cells[s]}
    for e in sweep.evaluate:
        if not models & set(e.datasets):
            raise BrainhpcError(f"{sweep.source}: evaluate entry {e.name!r}: no classify or "
                                f"segment cells on {', '.join(e.datasets)} to score")
        for ds in (n for n in e.datasets if n in models):
            if e.path is not None:
                source = {"data": str(e.path)}
            else:  # fresh phantoms drawn like the models' own
                lesions = next(d.phantom_lesions for d in sweep.datasets if d.name == ds)
                source = _set(phantom=e.phantom, seed=e.seed, phantom_lesions=lesions)
            plan.add("evaluate", ds, e.name, {"name": e.name, **source,
                                              **_set(labels=e.labels, split=e.split)},
                     folded=False)


def _other_cells(plan: _Plan) -> None:
    """Cells of the stages without a sweep syntax of their own (``StageBlock``)."""
    for stage, blocks in plan.sweep.others.items():
        for ds in plan.sweep.names:
            for block in (b for b in blocks if ds in b.datasets):
                for seed in block.seeds or (None,):
                    cid = block.name if seed is None else f"{block.name}-s{seed}"
                    plan.add(stage, ds, cid, {**block.options, **_set(seed=seed)})


def _drop_unused_folds(plan: _Plan) -> None:
    """Prepare only the folds some cell uses (``folds = [0]`` in every block: fold 0 alone);
    a dataset no folded cell uses keeps all its folds (a prepare-only sweep)."""
    used = {(dataset_of(c), c.params["fold"]) for s, cells in plan.cells.items()
            if s != "prepare" for c in cells if c.params.get("fold") is not None}
    datasets = {ds for ds, _ in used}
    plan.cells["prepare"] = [c for c in plan.cells["prepare"]
                             if dataset_of(c) not in datasets
                             or (dataset_of(c), c.params.get("fold")) in used]


def expand(sweep: Sweep, run_dir: Path) -> dict[str, list[Cell]]:
    """Every cell of every stage, in stage order; the config of each is built (and so checked)
    here."""
    stages.check_order(stages.TABLE)
    plan = _Plan(sweep, str(Path(run_dir).resolve()))
    _prepare_cells(plan)
    _generate_cells(plan)
    _model_cells(plan)
    _evaluate_cells(plan)
    _other_cells(plan)
    _drop_unused_folds(plan)
    plan.cells["aggregate"].append(Cell("aggregate", "results", {"name": sweep.name},
                                        plan.run_dir))
    for cells in plan.cells.values():
        for cell in cells:
            try:
                stage_config(cell)  # fail on bad options before anything is submitted
            except BrainhpcError as e:
                raise BrainhpcError(f"{sweep.source}: {e}") from None
    return plan.cells


def _wiring(cell: Cell) -> dict:
    """The paths a cell's config gets from the run layout (see the module docstring)."""
    rd = Path(cell.run_dir)
    named, fold = cell.params.get("dataset"), cell.params.get("fold")
    if cell.stage == "prepare":
        return {"out": rd / "prepare" / cell.id / "prepared"}
    if cell.stage == "evaluate":
        return {"run_dir": rd, "out": cell.folder, "dataset": named}
    if cell.stage == "aggregate":
        return {"run_dir": rd}
    return {"data": prepared_dir(rd, named or SINGLE, fold), "out": cell.folder,
            "synthetic_dir": synthetic_dir(rd, named, fold)}


def stage_config(cell: Cell, force: bool = False, device: str = "auto"):
    """The typed config of the stage function a cell runs.

    ``device`` comes from where the cell runs (``Sweep.device``: cuda when GPUs were requested),
    never from the sweep file, so a cell cannot ask for GPUs and then train on the CPU."""
    cls = stages.TABLE[cell.stage].config_class()
    names = {f.name for f in fields(cls)}
    params = {k: v for k, v in cell.params.items()
              if k != "dataset" and (k != "fold" or cell.stage == "prepare")}
    fixed = {k: v for k, v in {**_wiring(cell), "force": force, "progress": False,
                               "device": device}.items() if k in names}
    for key in params:
        if key in fixed or key not in names:
            why = "the sweep sets it" if key in fixed else "no such field"
            if key == "device":
                why = ("the sweep sets it from the resources (GPUs requested -> cuda, else "
                       "cpu)")
            raise BrainhpcError(f"{cell.stage}/{cell.id}: option {key!r}: {why} of "
                                f"{cls.__name__}; valid options: "
                                f"{', '.join(sorted(names - set(fixed)))}")
    try:
        return cls(**fixed, **params)
    except BrainhpcError as e:
        text = str(e).removeprefix(f"{cell.stage}: ")
        raise BrainhpcError(f"{cell.stage}/{cell.id}: {text}") from None
