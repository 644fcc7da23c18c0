"""The one training loop of brainhpc: generators now, classifiers next, all through ``Trainer``.

A model plugs in as a *task*: an object that builds its models and optimisers and does one
optimisation step on one batch (see ``Task``). The trainer owns everything around that step,
which is what HPC life needs:

* process group and device (``brainhpc.train.distributed``), DDP wrapping (BatchNorm
  synchronised across GPUs), a deterministic distributed batch sampler (global ``batch_size``
  split over ranks), per-rank seeding; a ``TensorDataset`` is batched by indexing its tensors
  (``TensorBatches``), on the GPU when it fits there;
* precision (``brainhpc.train.precision``): ``auto`` resolves per architecture to bf16 autocast
  with channels_last models and batches (tasks use ``with t.autocast():``) where that was measured
  faster, else fp32; fused Adam/AdamW/SGD; intra-op threads that fit the allocation; on GPUs
  cuDNN autotuning and TF32 matmuls;
* validation every ``val_every`` epochs and after the last one;
* EMA copies of chosen models (``task.ema_decay``);
* atomic checkpoints every N steps, every M minutes, on ``request_checkpoint()`` and on
  SIGUSR1/SIGTERM (saved at the next step boundary, with several ranks at the next check step;
  SIGTERM then stops the run, and a handler that was installed before ours, e.g. submitit's
  requeue, is called after the save);
* exact resume: models, optimisers, schedulers, EMA, step, epoch position and the python/numpy/
  torch RNG states of every rank; optimiser state takes its parameter's layout again (after a
  checkpoint of the other precision's layout); the precision is in the checkpoint's
  fingerprint. On CPU with ``num_workers=0`` an interrupted-then-resumed run ends bit-identical
  to an uninterrupted one (with workers, augmentation draws may differ);
* a JSONL metric log (``metrics.jsonl``), tqdm on rank 0 only, and ``progress.json`` (epoch and
  step of total, refreshed every few seconds) that the sweep's live status and ``status`` read;
* non-finite losses stop the run with ``BrainhpcError``; the last good checkpoint is kept;
* a corrupt or mismatched checkpoint is an error, never a silent restart.

Only rank 0 writes files. A step never waits for the device: metrics and the non-finite flag stay
there and are read at *check steps* only (every ``log_every`` steps, before a checkpoint, at an
epoch's end; a single process also when a signal or a non-finite host value asks). Ranks agree
at those steps (one tiny all-reduce) on "non-finite loss", "checkpoint now" and "stop", so a
signal seen by ranks at different moments cannot split them. A failing rank aborts the group
instead of waiting for its peers (``teardown(failed=...)``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from brainhpc import __version__
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import atomic_path, write_json, write_text
from brainhpc.train.distributed import DistInfo, init_distributed, teardown
from brainhpc.train.precision import (
    PRECISIONS,
    cuda_settings,
    fused_optimizers,
    resolve,
    restore_layout,
)

log = logging.getLogger(__name__)

CKPT_FORMAT = 1
STOP_SIGNALS = ("SIGTERM",)
PROGRESS_EVERY_S = 2.0  # progress.json is rewritten at most this often
DEVICE_DATA_SHARE = 0.25  # a TensorDataset goes to the GPU if it takes at most this of free memory


class Task(Protocol):
    """What the trainer trains. Required: ``models``, ``optimizers``, ``training_step``.

    Optional (looked up with ``getattr``): ``schedulers(optimizers) -> dict`` (stepped after
    every training step), ``validate(t) -> dict[str, float]`` (run on every rank after every
    ``val_every``-th epoch and the last, under ``torch.no_grad()`` with models in eval mode),
    ``ema_decay: dict[str, float]`` (models to keep an EMA copy of, in ``t.ema``),
    ``state_dict()``/``load_state_dict()`` for extra task state that must survive a resume,
    ``arch: str`` (the name ``precision.SPEEDUP`` knows it by; default: its model class names).
    """

    def models(self) -> dict[str, nn.Module]: ...

    def optimizers(self, models: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]: ...

    def training_step(self, t: Trainer, batch: Any) -> dict[str, torch.Tensor | float]: ...


@dataclass
class TrainConfig:
    """Loop settings. ``batch_size`` is global: each of W ranks gets ``batch_size / W``."""

    out: Path
    epochs: int = 1
    batch_size: int = 32
    seed: int = 0
    max_steps: int | None = None  # stop early after this many steps (None: run all epochs)
    shuffle: bool = True
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | bf16 | fp32 (brainhpc.train.precision)
    val_every: int = 1  # epochs between validations (the last epoch is always validated)
    checkpoint_every: int = 500  # steps; 0: only at the end, on request and by time
    checkpoint_minutes: float = 15.0  # wall-clock safety net for long epochs; 0: off
    log_every: int = 10  # steps between metric records
    progress: bool = True
    resume: bool = True  # continue from out/checkpoints/last.pt when it exists
    handle_signals: bool = True  # SIGUSR1: checkpoint; SIGTERM: checkpoint and stop
    best_metric: str | None = None  # a key of validate()'s dict; best.pt keeps the best epoch
    best_mode: str = "max"  # max | min
    identity_precision: str | None = None  # what the cell's identity says the run trains in

    def __post_init__(self):
        self.out = Path(self.out)
        for key in ("epochs", "batch_size", "log_every", "val_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise BrainhpcError(f"train config: {key} must be an integer >= 1, "
                                    f"got {getattr(self, key)!r}")
        for key in ("checkpoint_every", "num_workers"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise BrainhpcError(f"train config: {key} must be an integer >= 0, "
                                    f"got {getattr(self, key)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise BrainhpcError(
                f"train config: max_steps must be >= 1 or None, got {self.max_steps}")
        if self.checkpoint_minutes < 0:
            raise BrainhpcError(f"train config: checkpoint_minutes must be >= 0, "
                                f"got {self.checkpoint_minutes}")
        if self.precision not in PRECISIONS:
            raise BrainhpcError(f"train config: precision must be one of {', '.join(PRECISIONS)}"
                                f", got {self.precision!r}")
        if self.best_mode not in ("max", "min"):
            raise BrainhpcError(
                f"train config: best_mode must be 'max' or 'min', got {self.best_mode!r}")

    @classmethod
    def for_cell(cls, cell, **kw) -> TrainConfig:
        """The loop settings of a training cell (``brainhpc.cell.Training`` fields), plus ``kw``."""
        return cls(out=cell.out, seed=cell.seed, checkpoint_every=cell.checkpoint_every,
                   num_workers=cell.num_workers, device=cell.device, progress=cell.progress,
                   precision=cell.precision, identity_precision=cell.resolved_precision(), **kw)


class DistributedBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch; the order is a pure function of (seed, epoch).

    Every epoch is a fresh permutation drawn from ``seed + epoch``; the last partial global batch
    is dropped so that all ranks step together. ``set_epoch(epoch, start)`` skips the first
    ``start`` batches, which is how a resumed run picks up mid-epoch without any sampler RNG state.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        if batch_size % world_size:
            raise BrainhpcError(f"batch_size {batch_size} is not divisible by the {world_size} "
                                "processes of this run")
        if n < batch_size:
            raise BrainhpcError(f"{n} training items are fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.local = batch_size // world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start)

    def batches(self) -> torch.Tensor:
        """This rank's remaining batches of the epoch, one row of item indices each."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        whole = order[:self.steps_per_epoch * self.batch_size]
        return whole.view(self.steps_per_epoch, self.world, self.local)[self.start:, self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches().tolist()


class TensorBatches:
    """The batches of a ``TensorDataset``, one ``index_select`` per tensor: what a DataLoader with
    ``sampler`` and default collation yields (same items, order and values), without collating
    item by item. On a GPU the tensors are copied there once when they fit
    (``DEVICE_DATA_SHARE``), so a step moves no data from the host; otherwise each batch is
    gathered on the host into pinned memory and copied without blocking."""

    num_workers = 0

    def __init__(self, dataset: torch.utils.data.TensorDataset, sampler: DistributedBatchSampler,
                 device: torch.device):
        self.sampler, self.device = sampler, device
        self.tensors = list(dataset.tensors)
        self.resident = device.type != "cuda"
        if device.type == "cuda":
            need = sum(t.numel() * t.element_size() for t in self.tensors)
            free, _ = torch.cuda.mem_get_info(device)
            self.resident = need <= DEVICE_DATA_SHARE * free
            if self.resident:
                self.tensors = [t.to(device) for t in self.tensors]
            log.info("training set (%.0f MB) %s", need / 2**20, "on the GPU" if self.resident
                     else "too large for the GPU: batches gathered on the host")

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        rows = self.sampler.batches()
        if self.device.type == "cuda" and self.resident:
            rows = rows.pin_memory().to(self.device, non_blocking=True)  # once per epoch
        for idx in rows:
            batch = [t.index_select(0, idx) for t in self.tensors]
            yield batch if self.resident else [b.pin_memory() for b in batch]


def _to_device(batch: Any, device: torch.device,
               memory_format: torch.memory_format = torch.contiguous_format) -> Any:
    """Tensors to ``device``; image batches (4-D) also to ``memory_format``."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 4:
            return batch.to(device, non_blocking=True, memory_format=memory_format)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, memory_format) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, memory_format) for k, v in batch.items()}
    return batch


def sync_batchnorm(models: dict[str, nn.Module], world_size: int, device: torch.device
                   ) -> dict[str, nn.Module]:
    """BatchNorm layers as SyncBatchNorm when several GPUs train: each GPU's share of the batch
    is small, and per-GPU statistics would differ from one process's on the whole batch. On
    CPU (gloo) and in one process the models are returned as they are."""
    if world_size <= 1 or device.type != "cuda":
        return models
    return {k: nn.SyncBatchNorm.convert_sync_batchnorm(m) for k, m in models.items()}


def _image_size(dataset) -> int | None:
    """The last dimension of the first image-like tensor of item 0 (None if there is none)."""
    try:
        item = dataset[0]
    except Exception:  # an empty or lazy dataset: the precision table is then keyed by arch only
        return None
    items = item.values() if isinstance(item, dict) else \
        item if isinstance(item, (list, tuple)) else [item]
    for x in items:
        if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim >= 2:
            return int(x.shape[-1])
    return None


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Train ``task`` on ``dataset``; see the module docstring for what the trainer owns.

    Attributes a task uses inside ``training_step(t, batch)``: ``t.models[name]`` (DDP-wrapped
    when distributed), ``t.raw(name)`` (the bare module), ``t.optimizers[name]``, ``t.ema[name]``,
    ``t.device``, ``t.step`` (steps done before this one), ``t.epoch``, ``t.rank``,
    ``t.world_size``, ``t.autocast()``.
    """

    def __init__(self, task: Task, dataset: torch.utils.data.Dataset, cfg: TrainConfig,
                 fingerprint: dict | None = None, dist_info: DistInfo | None = None,
                 collate_fn=None):
        self.task, self.dataset, self.cfg = task, dataset, cfg
        self.info = dist_info or init_distributed(cfg.device)
        try:
            self._setup(task, dataset, cfg, fingerprint, collate_fn)
        except BaseException as e:
            if dist_info is None:  # we made the group, so we take it down
                teardown(self.info, failed=e)
            raise

    def _setup(self, task, dataset, cfg, fingerprint, collate_fn) -> None:
        self._state(cfg)
        self._loader(dataset, cfg, collate_fn)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        arch = self._build(task, dataset, cfg)
        self.fingerprint = {
            "task": type(task).__name__,
            "world_size": self.world_size,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "precision": self.precision.name,
            "shapes": {k: {n: list(p.shape) for n, p in m.state_dict().items()}
                       for k, m in self._raw.items()},
            **(fingerprint or {}),
        }
        resumed = cfg.resume and self.last_path.exists()
        rng = self._load(self.last_path) if resumed else None
        if resumed:
            fused_optimizers(self.optimizers)  # the loaded param groups carry the saved flags
        self.models = {k: self._wrap(m) for k, m in self._raw.items()}
        self.amp_dtype = self.precision.dtype
        if self.is_main:
            log.info("%s: %s (%s), %d threads, fused optimisers: %s", arch, self.precision.name,
                     self.precision.reason, torch.get_num_threads(), ", ".join(self.fused) or "-")
        if rng is not None:
            _set_rng_state(rng)
        else:
            seed_everything(cfg.seed + 100_003 * self.rank)
            if self.is_main and self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run starts a fresh log
        if resumed and self.is_main:
            self._truncate_metrics()
        self.resumed = resumed

    def _state(self, cfg: TrainConfig) -> None:
        """Where this rank is, where files go, and a fresh loop state."""
        self.rank, self.world_size = self.info.rank, self.info.world_size
        self.device = self.info.device
        self.is_main = self.info.is_main
        self.ckpt_dir = cfg.out / "checkpoints"
        self.last_path = self.ckpt_dir / "last.pt"
        self.best_path = self.ckpt_dir / "best.pt"
        self.metrics_path = cfg.out / "metrics.jsonl"
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best: dict = {"metric": cfg.best_metric, "value": None, "step": None}
        self.train_seconds = 0.0
        self.last_saved_step: int | None = None
        self._request = 0  # 0 nothing, 1 checkpoint, 2 checkpoint and stop
        self._chain: list[int] = []  # signals to pass on to the previous handler after saving
        self._prev_handlers: dict[int, Any] = {}
        self._closed = False
        self._progress_t = 0.0
        self._resumed_meter: dict | None = None
        self._host_bad: int | None = None  # first step with a non-finite host value
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # on device
        self._reset_meter()

    def _loader(self, dataset, cfg: TrainConfig, collate_fn) -> None:
        self.sampler = DistributedBatchSampler(len(dataset), cfg.batch_size, self.rank,
                                               self.world_size, cfg.seed, cfg.shuffle)
        self._loader_gen = torch.Generator()
        workers = cfg.num_workers
        if isinstance(dataset, torch.utils.data.TensorDataset) and collate_fn is None:
            if workers:  # in memory already: worker processes would only add start-up and copies
                log.info("in-memory dataset: no DataLoader workers (num_workers=%d ignored)",
                         workers)
            self.loader = TensorBatches(dataset, self.sampler, self.device)
            return
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", generator=self._loader_gen,
            persistent_workers=False, collate_fn=collate_fn)

    def _build(self, task, dataset, cfg: TrainConfig) -> str:
        """The task's models (on the device, in the resolved precision's memory format), its
        optimisers, schedulers and EMA copies; returns the architecture's name."""
        raw = task.models()
        if not raw:
            raise BrainhpcError(f"task {type(task).__name__}.models() returned no models")
        arch = getattr(task, "arch", None) or "+".join(sorted({type(m).__name__
                                                                for m in raw.values()}))
        self.precision = resolve(cfg.precision, self.device, arch, _image_size(dataset))
        said = cfg.identity_precision
        if said in ("fp32", "bf16") and said != self.precision.name:  # auto@...: not known then
            raise BrainhpcError(f"the cell's identity says {said} but {arch} resolves to "
                                f"{self.precision.name} ({self.precision.reason}) on "
                                f"{self.device}: its config's train_arch() names another model")
        self.memory_format = (torch.channels_last if self.precision.channels_last
                              else torch.contiguous_format)
        self._raw = {k: m.to(self.device, memory_format=self.memory_format)
                     for k, m in raw.items()}
        self._raw = sync_batchnorm(self._raw, self.world_size, self.device)
        cuda_settings(self.device)
        self.optimizers = task.optimizers(self._raw)
        self.fused = fused_optimizers(self.optimizers)
        sched = getattr(task, "schedulers", None)
        self.schedulers = sched(self.optimizers) if sched else {}
        self.ema_decay = dict(getattr(task, "ema_decay", {}) or {})
        for name in self.ema_decay:
            if name not in self._raw:
                raise BrainhpcError(f"task ema_decay names model {name!r}; models are "
                                    f"{', '.join(self._raw)}")
        self.ema = {k: copy.deepcopy(self._raw[k]).eval().requires_grad_(False)
                    for k in self.ema_decay}
        return arch

    # ---------------------------------------------------------------- helpers tasks use
    def raw(self, name: str) -> nn.Module:
        """The bare module (no DDP wrapper): for sampling, evaluation and saving."""
        return self._raw[name]

    def autocast(self):
        """bf16 autocast when the run's precision is bf16; a no-op in fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def total_steps(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def request_checkpoint(self, stop: bool = False) -> None:
        """Save at the next step boundary (then stop, if ``stop``). Safe in signal handlers."""
        self._request = max(self._request, 2 if stop else 1)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train until ``cfg.epochs`` (or ``max_steps``); returns a summary dict.

        ``status`` is "done", or "interrupted" when a stop was requested (state saved first).
        """
        self._install_signals()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main
                   and self.cfg.progress), desc=type(self.task).__name__, dynamic_ncols=True)
        self._start_meter()
        self._last_save_time = time.monotonic()
        self._t0 = time.monotonic() - self.train_seconds
        self._progress_t = 0.0
        self._progress()
        try:
            while self.epoch < self.cfg.epochs and self.step < self.total_steps:
                if self._run_epoch(bar):
                    return self._summary("interrupted")
            self._log_train(bar)
            if self.last_saved_step != self.step:
                self.save_checkpoint()
            self._progress(force=True)
            return self._summary("done")
        finally:
            bar.close()
            self._restore_signals()

    def _run_epoch(self, bar) -> bool:
        """The (rest of the) current epoch; True when a stop was agreed (state saved)."""
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        self._loader_gen.manual_seed(self.cfg.seed * 7919 + self.epoch)
        self._train_mode(True)
        for batch in self.loader:
            batch = _to_device(batch, self.device, self.memory_format)
            out = self.task.training_step(self, batch)
            for s in self.schedulers.values():
                s.step()
            self._update_ema()
            self.step += 1
            self.batch_in_epoch += 1
            self.train_seconds = time.monotonic() - self._t0
            self._accumulate(out)
            if self._after_step(bar):
                return True
            if self.step >= self.total_steps:
                break
        if self.batch_in_epoch >= self.steps_per_epoch:
            self._end_epoch()
        return False

    def _after_step(self, bar) -> bool:
        """Check, log and checkpoint as due; True to stop. Only check steps read the device."""
        cfg = self.cfg
        due = bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0
        save = stop = False
        if due or self._check_due():
            save, stop = self._agree()
        if self.step % cfg.log_every == 0:
            self._log_train(bar)
        bar.update(1)
        if save or stop or due:
            self.save_checkpoint()
        return stop

    def _check_due(self) -> bool:
        """Whether this step is a check step (every rank decides alike, except for a single
        process, which also checks at once for a signal or a non-finite host value)."""
        if (self.step % self.cfg.log_every == 0 or self.step >= self.total_steps
                or self.batch_in_epoch >= self.steps_per_epoch):
            return True
        return self.world_size == 1 and bool(
            self._request or self._host_bad is not None or self._time_due())

    def _time_due(self) -> bool:
        minutes = self.cfg.checkpoint_minutes
        return bool(minutes) and time.monotonic() - self._last_save_time > 60 * minutes

    def _end_epoch(self) -> None:
        validate = getattr(self.task, "validate", None)
        due = (self.epoch + 1) % self.cfg.val_every == 0 or self.epoch + 1 >= self.cfg.epochs
        if validate is not None and due:
            self._train_mode(False)
            with torch.no_grad():
                metrics = {k: float(v) for k, v in validate(self).items()}
            self._train_mode(True)
            self._write_record({"kind": "val", "step": self.step, "epoch": self.epoch, **metrics})
            self._update_best(metrics)
        self.epoch += 1
        self.batch_in_epoch = 0
        self._progress()

    def _update_best(self, metrics: dict) -> None:
        key = self.cfg.best_metric
        if key is None:
            return
        if key not in metrics:
            raise BrainhpcError(f"best_metric {key!r} is not among the validation metrics "
                                f"{', '.join(metrics)}")
        value, old = metrics[key], self.best["value"]
        better = old is None or (value > old if self.cfg.best_mode == "max" else value < old)
        if math.isfinite(value) and better:
            self.best = {"metric": key, "value": value, "step": self.step, "epoch": self.epoch}
            if self.is_main:
                state = {"format": CKPT_FORMAT, "fingerprint": self.fingerprint,
                         "best": self.best, "step": self.step, "epoch": self.epoch,
                         "models": {k: m.state_dict() for k, m in self._raw.items()},
                         "ema": {k: m.state_dict() for k, m in self.ema.items()}}
                with atomic_path(self.best_path) as tmp:
                    torch.save(state, tmp)
                log.info("best %s=%.4g at epoch %d -> %s", key, value, self.epoch, self.best_path)

    def _train_mode(self, on: bool) -> None:
        for m in self._raw.values():
            m.train(on)

    def _update_ema(self) -> None:
        if not self.ema:
            return
        with torch.no_grad():
            for name, ema in self.ema.items():
                decay = min(self.ema_decay[name], (1 + self.step) / (10 + self.step))
                src = self._raw[name]
                e_params = [p for p in ema.parameters() if p.is_floating_point()]
                s_params = [p.detach() for p in src.parameters() if p.is_floating_point()]
                torch._foreach_lerp_(e_params, s_params, 1.0 - decay)
                for eb, sb in zip(ema.buffers(), src.buffers(), strict=True):
                    eb.copy_(sb)

    # ---------------------------------------------------------------- metrics
    def _reset_meter(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}  # device tensors, or host floats
        self._count = 0
        self._meter_t = time.monotonic()

    def _start_meter(self) -> None:
        """A fresh metric window, or the one a resumed checkpoint was saved in."""
        self._reset_meter()
        meter, self._resumed_meter = self._resumed_meter, None
        if meter:
            host = set(meter.get("host", ()))
            self._sums = {k: v if k in host else torch.tensor(v, device=self.device)
                          for k, v in meter["sums"].items()}
            self._count = int(meter["count"])

    def _accumulate(self, out: dict) -> None:
        """Add a step's metrics to the window without waiting for the device: tensors stay
        there, and the first step whose window sum is non-finite is kept there too."""
        if not isinstance(out, dict):
            raise BrainhpcError(f"{type(self.task).__name__}.training_step must return a dict of "
                                f"metrics, got {type(out).__name__}")
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().reshape(()).to(self.device)  # a no-op when there already
            else:
                v = float(v)
                if not math.isfinite(v) and self._host_bad is None:
                    self._host_bad = self.step
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._count += 1
        self._last_out = out
        sums = [v for v in self._sums.values() if isinstance(v, torch.Tensor)]
        if sums:
            bad = ~torch.isfinite(torch.stack(sums)).all()
            self._first_bad = torch.where(bad & (self._first_bad < 0), self.step,
                                          self._first_bad)

    def _agree(self) -> tuple[bool, bool]:
        """One small all-reduce at a check step: raises ``BrainhpcError`` when any rank saw a
        non-finite metric since the last check; else (save requested, stop requested)."""
        req = self._request
        if self.is_main and self._time_due():
            req = max(req, 1)
        host_bad = -math.inf if self._host_bad is None else -float(self._host_bad)
        flags = torch.tensor([float(req >= 1), float(req >= 2), host_bad], dtype=torch.float64)
        flags = flags.to(self.device)
        dev_bad = torch.where(self._first_bad >= 0, -self._first_bad.double(), -math.inf)
        flags[2] = torch.maximum(flags[2], dev_bad)  # -(first bad step): max is the earliest
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        save, stop, bad = flags.tolist()
        if bad > -math.inf:
            raise BrainhpcError(self._nan_message(int(-bad)))
        return bool(save), bool(stop)

    def _nan_message(self, step: int) -> str:
        last = {k: (float(v) if isinstance(v, torch.Tensor) else v)
                for k, v in self._last_out.items()}
        kept = (f"last good checkpoint (step {self.last_saved_step}) kept at {self.last_path}"
                if self.last_saved_step is not None else "no checkpoint was saved yet")
        return (f"non-finite loss at step {step} (epoch {self.epoch}) of "
                f"{type(self.task).__name__} (values at step {self.step}: {last}); training "
                f"stopped, {kept}. Lower the learning rate or check the data")

    def _log_train(self, bar) -> None:
        if not self._count:
            return
        keys = list(self._sums)
        vals = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device)
                            for v in self._sums.values()]) / self._count
        if self.world_size > 1:
            dist.all_reduce(vals)
            vals /= self.world_size
        dt = max(time.monotonic() - self._meter_t, 1e-9)
        rec = {"kind": "train", "step": self.step, "epoch": self.epoch,
               **{k: round(v, 6) for k, v in zip(keys, vals.tolist(), strict=True)},
               "img_per_s": round(self._count * self.cfg.batch_size / dt, 2)}
        for name, opt in self.optimizers.items():
            rec[f"lr_{name}"] = opt.param_groups[0]["lr"]
        self._write_record(rec)
        self._progress()
        if self.is_main and bar is not None and not bar.disable:
            bar.set_postfix({k: f"{rec[k]:.4g}" for k in keys[:4]}, refresh=False)
        self._reset_meter()

    def _progress(self, force: bool = False) -> None:
        """``progress.json`` (rank 0): where training stands, for live status views."""
        now = time.monotonic()
        if not self.is_main or (not force and now - self._progress_t < PROGRESS_EVERY_S):
            return
        self._progress_t = now
        write_json(self.cfg.out / "progress.json", {
            "epoch": min(self.epoch + 1, self.cfg.epochs), "epochs": self.cfg.epochs,
            "step": self.step, "steps": self.total_steps,
            "train_seconds": round(self.train_seconds, 1), "updated": time.time()})

    def _write_record(self, rec: dict) -> None:
        if not self.is_main:
            return
        rec = {**rec, "time": round(self.train_seconds, 3)}
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop records written after the checkpoint we resume from (they will be redone)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            step, kind = rec.get("step", 0), rec.get("kind")
            # at the checkpoint's own step: its train record came before the save; a validation
            # record counts only if that epoch was closed before the save
            if step < self.step or (step == self.step and (
                    kind == "train" or rec.get("epoch", 0) < self.epoch)):
                keep.append(line)
        write_text(self.metrics_path, "".join(x + "\n" for x in keep))

    def _summary(self, status: str) -> dict:
        return {"status": status, "step": self.step, "epoch": self.epoch,
                "train_seconds": round(self.train_seconds, 3), "checkpoint": str(self.last_path),
                "best": self.best, "resumed": self.resumed,
                "precision": self.precision.as_dict(), "threads": torch.get_num_threads(),
                "fused_optimizers": self.fused}

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``last.pt`` atomically (rank 0). Collective: every rank must call it together."""
        rng = _rng_state()  # per rank, with the metric window so resumed logs match
        rng["meter"] = {"sums": {k: float(v) for k, v in self._sums.items()},
                        "count": self._count, "host": [k for k, v in self._sums.items()
                                                       if not isinstance(v, torch.Tensor)]}
        if self.world_size > 1:
            all_rng: list = [None] * self.world_size
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        if self.is_main:
            sched = {k: s.state_dict() for k, s in self.schedulers.items()}
            task_state = self.task.state_dict() if hasattr(self.task, "state_dict") else {}
            state = {
                "format": CKPT_FORMAT, "brainhpc": __version__, "fingerprint": self.fingerprint,
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "train_seconds": self.train_seconds, "best": self.best,
                "models": {k: m.state_dict() for k, m in self._raw.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": sched, "ema": {k: m.state_dict() for k, m in self.ema.items()},
                "task": task_state, "rng": all_rng,
            }
            with atomic_path(self.last_path) as tmp:
                torch.save(state, tmp)
            log.debug("checkpoint step %d -> %s", self.step, self.last_path)
        self.last_saved_step = self.step
        self._last_save_time = time.monotonic()
        self._request = 0
        for signum in self._chain:
            prev = self._prev_handlers.get(signum)
            if callable(prev):
                prev(signum, None)
        self._chain = []
        return self.last_path

    def _load(self, path: Path) -> dict:
        """Restore everything from ``path``; returns this rank's RNG state (applied last)."""
        hint = "delete it (or pass --force) to start over, or point --out elsewhere"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, pickle garbage, wrong file: all the same to a user
            raise BrainhpcError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}: "
                                f"{e}); {hint}") from e
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise BrainhpcError(
                f"{path}: checkpoint format {got!r}, expected {CKPT_FORMAT}; {hint}")
        # a checkpoint from before the precision was recorded resumes under the current one
        old = {"precision": self.fingerprint["precision"], **state.get("fingerprint", {})}
        diff = [k for k in sorted(set(old) | set(self.fingerprint))
                if old.get(k) != self.fingerprint.get(k)]
        if diff:
            shown = []
            for k in diff:
                if k == "shapes":
                    shown.append("model shapes differ")
                else:
                    shown.append(f"{k}: checkpoint {old.get(k)!r} vs now "
                                 f"{self.fingerprint.get(k)!r}")
            raise BrainhpcError(f"{path}: checkpoint belongs to a different run "
                                f"({'; '.join(shown)}); {hint}")
        try:
            for k, m in self._raw.items():
                m.load_state_dict(state["models"][k])
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
                restore_layout(o)
            for k, s in self.schedulers.items():
                s.load_state_dict(state["schedulers"][k])
            for k, m in self.ema.items():
                m.load_state_dict(state["ema"][k])
            if hasattr(self.task, "load_state_dict"):
                self.task.load_state_dict(state.get("task", {}))
            rng = state["rng"][self.rank]
            self._resumed_meter = rng.get("meter")
            self.step, self.epoch = int(state["step"]), int(state["epoch"])
            self.batch_in_epoch = int(state["batch_in_epoch"])
            self.train_seconds = float(state.get("train_seconds", 0.0))
            self.best = state.get("best", self.best)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise BrainhpcError(f"{path}: checkpoint does not match this run ({type(e).__name__}: "
                                f"{e}); {hint}") from e
        self.last_saved_step = self.step
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                 self.batch_in_epoch)
        return rng

    # ---------------------------------------------------------------- signals and teardown
    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        log.warning("%s received: checkpoint at the next step boundary%s", name,
                    " then stop" if name in STOP_SIGNALS else "")
        self.request_checkpoint(stop=name in STOP_SIGNALS)
        self._chain.append(signum)

    def _install_signals(self) -> None:
        if not self.cfg.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGUSR1", "SIGTERM"):
            sig = getattr(signal, name, None)
            if sig is not None:
                self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, prev in self._prev_handlers.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._prev_handlers = {}

    def _wrap(self, m: nn.Module) -> nn.Module:
        if self.world_size > 1 and any(p.requires_grad for p in m.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(m, device_ids=ids)
        return m

    def close(self, failed: BaseException | bool = False) -> None:
        """Drop DDP wrappers, barrier, destroy the group (if we made it); after a failure abort
        it without a barrier (``distributed.teardown``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.models = dict(self._raw)
        teardown(self.info, failed)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc if exc is not None else False)

    def best_module(self, name: str) -> nn.Module:
        """Model ``name`` with the best validation epoch's weights (``best.pt``), in eval mode; the
        last weights, with a warning, when no validation value was ever finite."""
        model = self.raw(name)
        if self.best_path.exists():
            state = torch.load(self.best_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["models"][name])
        else:
            log.warning("%s: no best checkpoint (validation never finite); using the last "
                        "weights", self.cfg.out)
        return model.eval()


def run_training(task: Task, dataset, cfg: TrainConfig, fingerprint: dict,
                 info: DistInfo) -> tuple[Trainer, dict]:
    """Build the trainer, fit, close the DDP wrappers; the trainer and ``fit``'s summary. A run
    that did not finish (stopped by a signal) says how to resume."""
    trainer = Trainer(task, dataset, cfg, fingerprint=fingerprint, dist_info=info)
    try:
        result = trainer.fit()
    except BaseException as e:
        trainer.close(failed=e)
        raise
    trainer.close()
    if result["status"] != "done":
        log.warning("%s: training %s at step %d; re-run to resume", cfg.out, result["status"],
                    result["step"])
    return trainer, result


def config_dict(cfg: TrainConfig) -> dict:
    """JSON-friendly view of a TrainConfig (for cards and logs)."""
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    return d


