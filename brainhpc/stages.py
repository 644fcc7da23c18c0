"""The stage table: the one place that names every stage, its config, its function, its command.

A stage is a plain function of a typed config (``brainhpc.options``) that writes into its own
folder through the one cell lifecycle (``brainhpc.cell``). The table gives, per stage, the config
class and the function (as ``module:name``, imported only when used, so the table imports no
stage), the line that ``brainhpc --help`` shows, whether its cells want GPUs on a GPU profile,
and which stages must have ended before it starts in a sweep.

Adding a stage is two edits: its package (a config dataclass and a function, next to the
others), and a line here, after the stages it waits for (and before aggregate, which waits for
it). ``brainhpc <stage>``, the sweep's cells (``brainhpc.sweep.plan``),
resources and dependencies all follow from the table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from brainhpc.errors import BrainhpcError


@dataclass(frozen=True)
class Stage:
    """One stage. ``gpu`` stages get ``gpus_per_node`` GPUs per cell on a GPU profile (one DDP
    task per GPU); ``after``: the stages whose jobs must have ended (afterany) before it runs;
    ``command``: it has a ``brainhpc <name>`` subcommand generated from its config."""

    name: str
    config: str  # "module:ConfigClass"
    function: str  # "module:function"
    help: str
    gpu: bool = False
    after: tuple[str, ...] = ()
    command: bool = True

    def config_class(self) -> type:
        return _load(self.config)

    def run(self, cfg) -> dict:
        return _load(self.function)(cfg)


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "brainhpc.prepare:PrepareConfig", "brainhpc.prepare:prepare",
          "pre-process a labelled MRI folder (or phantom data) into split HDF5 shards"),
    Stage("generate", "brainhpc.generate:GenerateConfig", "brainhpc.generate:generate",
          "train a generator for one label and write synthetic shards",
          gpu=True, after=("prepare",)),
    Stage("classify", "brainhpc.classify:ClassifyConfig", "brainhpc.classify:classify",
          "train a CNN or VAE classifier on real/synthetic/mixed data and score it",
          gpu=True, after=("prepare", "generate")),
    Stage("segment", "brainhpc.segment:SegmentConfig", "brainhpc.segment:segment",
          "train a U-Net tumour segmenter on real/synthetic/mixed image+mask pairs",
          gpu=True, after=("prepare", "generate")),
    Stage("evaluate", "brainhpc.evaluate:EvaluateConfig", "brainhpc.evaluate:evaluate",
          "score saved models (classifiers, U-Nets) on another dataset, rules frozen",
          after=("classify", "segment")),
    Stage("aggregate", "brainhpc.sweep.aggregate:AggregateConfig",
          "brainhpc.sweep.aggregate:aggregate_cell",
          "collect a sweep run's cells into CSVs, tables and plots",
          after=("prepare", "generate", "classify", "segment", "evaluate"), command=False),
)}
NAMES = tuple(TABLE)


def check_order(table: dict[str, Stage]) -> None:
    """Every stage comes after the stages it waits for: sweeps submit and run the stages in
    table order, so a stage listed before what it needs would not wait for it."""
    seen: set[str] = set()
    for stage in table.values():
        late = [a for a in stage.after if a not in seen]
        if late:
            raise BrainhpcError(f"stage table: {stage.name} waits for {', '.join(late)}, which "
                                f"must come before it in brainhpc/stages.py")
        seen.add(stage.name)


check_order(TABLE)
