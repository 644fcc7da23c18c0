"""The one lifecycle of every cell: a stage function of a typed config writing into ``cfg.out``.

``run_cell(cfg, body, outputs)`` does, for every stage, what is not the stage's own work:

* **identity**: what defines the outputs, from the config's fields (``identity``; fields marked
  ``run=True`` in their ``option`` say how to run and are left out), paths resolved; a training
  cell's also holds the precision it will train in, resolved for the device it runs on;
* **skip**: ``OUT/<result>`` (``outputs.result``, written last: the completion marker) holds a
  finished run of the same identity: it is returned as it is, nothing runs;
* **refuse**: ``OUT`` holds a finished run of another identity, or an unfinished one that left a
  checkpoint to resume from: ``BrainhpcError`` naming each key that differs, unless ``force``
  (an attempt that failed before it saved anything is simply run over);
* **force**: the stage's outputs (``outputs.wipe`` and the result) are removed first, on rank 0,
  and every rank waits for that before it looks at the folder;
* **resume**: an unfinished run of the same identity simply runs again; the trainer resumes from
  ``OUT/checkpoints/last.pt``;
* **distributed set-up and teardown** around the body (``distributed=True``: torchrun or SLURM
  tasks make every rank run the body; rank 0 alone writes files); a rank whose body raises
  aborts the group, so that no rank waits for it until the group timeout;
* ``OUT/config.json``: written when the body starts (status ``running``) and updated when it
  ends (``done``, ``interrupted`` or ``failed`` with the error);
* **provenance**: the result records the code that ran (``code``: ``brainhpc.provenance``).

A body is ``body(ctx) -> dict`` with a ``status``; it calls ``ctx.finish(result)`` to write the
result file (rank 0) once everything else is written. ``outputs.incremental`` stages (evaluate)
run again when finished: their body skips what it already did.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, fields
from pathlib import Path

from brainhpc import __version__
from brainhpc.data.prepared import is_prepared, prepared_size
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, write_json
from brainhpc.options import option
from brainhpc.provenance import code_version
from brainhpc.train.distributed import DEVICES, device_for, local_placement
from brainhpc.train.precision import PRECISIONS, identity_name

log = logging.getLogger(__name__)

CONFIG = "config.json"
RESUME = "checkpoints/last.pt"  # what an unfinished training run resumes from


def out_option(what: str = "output folder of this cell") -> Field:
    return option(help=what, run=True)


def force_option() -> Field:
    return option(False, "start over: remove this stage's outputs in the folder first", run=True)


def device_option() -> Field:
    return option("auto", "auto | cpu | cuda", choices=DEVICES, run=True)


def progress_option() -> Field:
    return option(True, "progress bars (rank 0)", run=True)


class Config:
    """What every stage config has: ``identity()``, what defines its outputs."""

    def identity(self) -> dict:
        return identity(self)


@dataclass(kw_only=True)
class Training(Config):
    """How a training cell runs. None of these fields is in the identity as given; the precision
    the cell trains in is, resolved (``resolved_precision``): a cell requeued onto another GPU
    model, or run again with another --precision, is another cell if it computes otherwise."""

    force: bool = force_option()
    checkpoint_every: int = option(500, "steps between checkpoints", min=0, run=True)
    device: str = device_option()
    precision: str = option("auto", "auto (bf16 where measured faster on this hardware) | bf16 "
                            "| fp32", choices=PRECISIONS, run=True)
    num_workers: int = option(0, "DataLoader worker processes", min=0, run=True, flag="workers")
    progress: bool = progress_option()

    def identity(self) -> dict:
        d = super().identity()
        if d.get("train_data") == "real" and "synthetic_dir" in d:
            d["synthetic_dir"] = None  # where synthetic shards live does not matter to real data
        d["precision"] = self.resolved_precision()
        return d

    def train_arch(self) -> str | None:
        """The name ``precision.SPEEDUP`` knows this cell's model by (the trainer's
        ``task.arch``, else its model class): a config's ``arch`` field; stages whose model is
        named otherwise override this (None: unknown, see ``resolved_precision``)."""
        arch = getattr(self, "arch", None)
        return arch if isinstance(arch, str) else None

    def train_size(self) -> int | None:
        """The image side the cell trains at: its prepared dataset's (None before it exists)."""
        data = getattr(self, "data", None)
        return prepared_size(data) if data is not None and is_prepared(data) else None

    def resolved_precision(self) -> str:
        """"fp32" or "bf16" as the trainer will resolve ``precision`` on the device this process
        will train on (``precision.identity_name``; "auto@<hardware>" where that depends on a
        model ``train_arch`` does not name)."""
        local_rank, _ = local_placement()
        try:
            device = device_for(self.device, local_rank, None)
        except BrainhpcError:  # e.g. more ranks than GPUs: init_distributed says so, loudly
            device = device_for(self.device, 0)
        return identity_name(self.precision, device, self.train_arch(), self.train_size())


@dataclass(frozen=True)
class Outputs:
    """What a stage leaves in its folder: the result file written last and what ``force``
    removes besides it. ``swap``: the body builds the folder elsewhere and renames it into place
    whole (prepare), so nothing is removed first and no config.json is kept in it.
    ``incremental``: a finished run runs again, its body skipping what is already done."""

    result: str
    wipe: tuple[str, ...] = ()
    swap: bool = False
    incremental: bool = False


def identity(cfg) -> dict:
    """The config's fields without the how-to-run ones, as JSON values (paths resolved)."""
    d = {}
    for f in fields(cfg):
        if f.metadata.get("run"):
            continue
        value = getattr(cfg, f.name)
        d[f.name] = str(value.resolve()) if isinstance(value, Path) else value
    return json.loads(json.dumps(d, default=str))  # tuples -> lists: equal to a re-read JSON


def _read(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BrainhpcError(f"{path}: unreadable ({e}); use --force to start over") from e
    return rec if isinstance(rec, dict) else {}


def differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def defaults(cfg) -> dict:
    """The identity fields of ``cfg``'s class that have a default, at that default (JSON)."""
    d = {f.name: f.default for f in fields(cfg)
         if not f.metadata.get("run") and f.default is not MISSING}
    return json.loads(json.dumps(d, default=str))


def _recorded(rec: dict, ident: dict, known: dict | None = None) -> dict:
    """The identity ``rec`` was made with. Records from before the precision was part of a
    training cell's identity: the precision its result names, or (unfinished) the current one.
    Records from before a field existed: that field at its default (``known``), because a new
    field's default is what the code did before it, so adding one never orphans a finished
    cell; a new field set otherwise is a different computation."""
    old = rec.get("config", {})
    if not isinstance(old, dict):
        return old
    if "precision" in ident and "precision" not in old:
        trained = rec.get("train_precision")
        name = trained.get("name") if isinstance(trained, dict) else None
        old = {**old, "precision": name or ident["precision"]}
    added = {k: v for k, v in (known or {}).items() if k in ident and k not in old}
    return {**old, **added} if old else old


def previous(out: Path, ident: dict, outputs: Outputs, stage: str,
             known: dict | None = None) -> dict | None:
    """The finished result to skip with, None to run (new or resumed); raises when ``out``
    holds a run of another identity. ``known``: the config class's defaults (``defaults``)."""
    for name in (outputs.result, CONFIG):
        rec = _read(Path(out) / name)
        if rec is None:
            continue
        old = _recorded(rec, ident, known)
        finished = name == outputs.result and rec.get("status", "done") == "done"
        if old != ident and not finished and not (Path(out) / RESUME).exists():
            continue  # an attempt that left nothing to resume from: nothing is lost
        if old != ident:
            what = "a finished" if finished else "an unfinished"
            raise BrainhpcError(f"{out} holds {what} {stage} run with a different config "
                                f"({differences(old, ident)}); use --force to overwrite it or "
                                "choose another --out")
        if finished and not outputs.incremental:
            return rec
    return None


def wipe(out: Path, outputs: Outputs) -> None:
    """Remove what a run of this stage leaves in ``out`` (never anything else)."""
    for name in (*outputs.wipe, outputs.result, CONFIG):
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@dataclass
class Context:
    """What a body gets: the identity, the process's place in the group, the start time."""

    cfg: object
    ident: dict
    info: object  # brainhpc.train.distributed.DistInfo
    outputs: Outputs
    t_start: float

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def code(self) -> dict:
        """The code this cell runs (``brainhpc.provenance.code_version``), for its result."""
        return code_version()

    def finish(self, result: dict) -> dict:
        """Write the result file (rank 0), last: the completion marker; returns ``result``.
        It records the code that ran (``code``), so stale results can be found and redone."""
        result = {**result, "status": result.get("status", "done"),
                  "wall_seconds": round(time.time() - self.t_start, 3),
                  "brainhpc": __version__, "config_hash": config_hash(self.ident),
                  "config": self.ident, "code": self.code}
        if self.info.is_main:
            write_json(self.out / self.outputs.result, result)
        return result


def _started(ctx: Context, status: str, **extra) -> None:
    if ctx.info.is_main and not ctx.outputs.swap:
        write_json(ctx.out / CONFIG, {"status": status, "config": ctx.ident,
                                      "brainhpc": __version__, **extra})


def run_cell(cfg, body: Callable[[Context], dict], outputs: Outputs,
             distributed: bool = False) -> dict:
    """Skip, refuse or run ``body`` on ``cfg`` (see the module docstring); returns its result."""
    from brainhpc.train.distributed import DistInfo, barrier, init_distributed, teardown

    stage = getattr(cfg, "stage", type(cfg).__name__)
    ident = cfg.identity()
    force = bool(getattr(cfg, "force", False))
    if not force:
        done = previous(cfg.out, ident, outputs, stage, defaults(cfg))
        if done is not None:
            log.info("%s: finished (%s), skipping; use --force to redo", cfg.out, outputs.result)
            return {**done, "skipped": True}
    info = init_distributed(getattr(cfg, "device", "auto")) if distributed else DistInfo()
    ctx = Context(cfg, ident, info, outputs, time.time())
    info.on_peer_failure = lambda why: _started(ctx, "failed", error=why)
    try:
        if force and not outputs.swap:
            if info.is_main:
                wipe(cfg.out, outputs)
            barrier(info)  # no rank may see old outputs after rank 0 decided to start over
        _started(ctx, "running")
        try:
            result = body(ctx)
        except Exception as e:
            _started(ctx, "failed", error=f"{type(e).__name__}: {e}")
            raise
        if result.get("status") not in ("worker",):
            _started(ctx, result.get("status", "done"))
    except BaseException as e:
        teardown(info, failed=e)  # no barrier: the other ranks may wait in a collective
        raise
    teardown(info)
    return result
