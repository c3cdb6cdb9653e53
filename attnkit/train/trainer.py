"""The training loop: build the data, the model (plain backbone first, then attention, so that every variant of
a seed shares the backbone's initialisation), optionally load pretrained weights and freeze the backbone; then
train with checkpoints after every epoch that --resume continues exactly."""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..cost import count_macs, count_params
from ..data import Dataset, load_dataset
from ..data.loader import Loader
from ..files import write_bytes, write_json
from ..runs import TrainConfig, build_model, load_checkpoint, load_weights, model_arch, nonfinite_tensors, save_checkpoint
from ..surgery import AttachReport, load_pretrained
from .distributed import Distributed, setup_distributed
from .environment import environment, warn_if_different
from .logger import MetricsLogger
from .optim import build_optimizer, build_schedule
from .runlock import RunFolderLock

__all__ = ["TrainResult", "read_result", "seed_everything", "train"]


@dataclass
class TrainResult:
    run_dir: str
    variant: str
    seed: int
    test_acc: float  # after the last epoch: what is reported (the best epoch on the test set would be selection)
    best_acc: float
    best_epoch: int
    params: int
    macs: int
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)  # what the numbers are reproducible on (environment())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_result(path: Path) -> dict[str, Any]:
    """A finished run's result.json: its training options and every field of TrainResult, else a ValueError
    naming the file."""
    advice = "Delete it to have the run read back from its last checkpoint, or use another folder."
    try:
        result = json.loads(path.read_bytes())
    except ValueError as error:  # not UTF-8, not JSON: damaged or cut short
        raise ValueError(f"{path} is not readable JSON ({type(error).__name__}: {error}). {advice}") from None
    missing = [name for name in ["config", *(f.name for f in fields(TrainResult) if f.name != "environment")]
               if not isinstance(result, dict) or name not in result]
    if missing:
        raise ValueError(f"{path} is not a finished run's result: it lacks {', '.join(missing)}. {advice}")
    try:
        TrainConfig.from_dict(result["config"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: its 'config' is not a valid training configuration ({error}). {advice}") from None
    return result


def seed_everything(seed: int) -> None:
    """The one place randomness is seeded: Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _classifier_name(model: nn.Module) -> str:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("--freeze backbone: the model has no nn.Linear classifier to keep trainable.")
    return names[-1]


def _freeze_backbone(model: nn.Module, report: AttachReport | None, log: Callable[[str], None]) -> list[nn.Module]:
    """Train only the inserted attention and the classifier; frozen BatchNorms keep their statistics (eval mode).
    Returns the frozen BatchNorm layers."""
    keep = [site.module for site in report.sites] if report else []
    keep.append(_classifier_name(model))
    for name, p in model.named_parameters():
        p.requires_grad = any(name.startswith(k + ".") for k in keep)
    frozen = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and not any(p.requires_grad for p in m.parameters())]
    log(f"trainable: {count_params(model, True):,} of {count_params(model):,} parameters "
        f"({len(keep) - 1} attention sites and the classifier {keep[-1]})")
    return frozen


def _progress(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    return tqdm(iterable, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)


@dataclass
class Training:
    """What a run trains with, made once by _Run.setup() and passed to every epoch and evaluation: the network, its
    data, its optimiser and schedule, and how far the run has got (a resumed run's progress is read back into it)."""

    arch: dict[str, Any]  # what checkpoints store to rebuild the network
    model: nn.Module  # the network whose weights are saved
    runner: nn.Module  # what runs the batches: the model, wrapped by DistributedDataParallel and torch.compile
    trainable: list[nn.Parameter]
    frozen_bn: list[nn.Module]  # BatchNorms of a frozen backbone, kept in eval mode
    train_loader: Loader
    test_loader: Loader
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    macs: int
    history: list[dict[str, Any]] = field(default_factory=list)  # a row per epoch; the skip budget counts them all
    best: tuple[float, int] = (-1.0, 0)  # test accuracy, epoch
    saved_epoch: int = 0  # the epoch last.pt holds

    def checkpoint(self, config: TrainConfig, epoch: int) -> dict[str, Any]:
        """What last.pt (and best.pt) hold after `epoch` epochs: enough to rebuild the network and to resume."""
        return {
            "config": config.to_dict(),
            "arch": self.arch,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": self.history,
            "best_acc": self.best[0],
            "best_epoch": self.best[1],
            "environment": environment(),
        }


class _Run:
    """One training run: its options, its processes and its folder; setup() makes the Training that train_epoch()
    and evaluate() take, and run() drives them."""

    def __init__(self, config: TrainConfig, dist: Distributed) -> None:
        self.config, self.dist = config, dist
        self.verbose = config.progress and dist.is_main
        self.run_dir = Path(config.run_dir or config.default_run_dir())
        self.device = dist.device
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]

    def log(self, message: str) -> None:
        if self.verbose:
            tqdm.write(message)

    def say(self, message: str) -> None:
        """What is printed even with --no-progress."""
        if self.dist.is_main:
            tqdm.write(message)

    def resume_state(self) -> dict[str, Any] | None:
        last = self.run_dir / "last.pt"
        if not last.exists():
            if self.config.resume:
                self.log(f"--resume: no checkpoint in {self.run_dir} yet; starting from the beginning.")
            return None
        state = load_checkpoint(last, resumable=True)
        if not self.config.resume:
            raise FileExistsError(
                f"{self.run_dir} already holds a run (epoch {state['epoch']} of {state['config']['epochs']}). "
                f"Pass --resume to continue it, or --run-dir for a new run."
            )
        differences = self.config.differences(TrainConfig.from_dict(state["config"]))
        if differences:
            listed = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (new, old) in differences.items())
            raise ValueError(f"--resume: {last} was trained with other options ({listed}). Resume with the same options or use another --run-dir.")
        warn_if_different(state.get("environment"), f"--resume: {last}")
        if self.dist.is_main:
            self._repair_best(state, last)
        return state

    def _repair_best(self, state: dict[str, Any], last: Path) -> None:
        """best.pt is written before last.pt, so last.pt never gets ahead of it; in a folder where it did (a kill
        between the two, as they were once written), best.pt is made again from last.pt when that holds the best
        epoch."""
        best = self.run_dir / "best.pt"
        if state["best_epoch"] != state["epoch"]:
            return
        try:
            current = best.is_file() and load_checkpoint(best)["epoch"] == state["epoch"]
        except ValueError:
            current = False
        if not current:
            write_bytes(best, last.read_bytes())
            self.log(f"best.pt did not hold the best epoch, {state['epoch']}; copied it from {last}")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def batches(self, loader: Loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in loader:
            yield (x.to(self.device, non_blocking=True, memory_format=self.memory_format),
                   y.to(self.device, non_blocking=True))

    def setup(self, saved: dict[str, Any] | None) -> Training:
        """The data, the network (pretrained weights loaded, backbone frozen, on its device), the optimiser and the
        schedule; then, with `saved`, the state of the run being resumed."""
        cfg, dist = self.config, self.dist
        seed_everything(cfg.seed)
        if cfg.download:  # one process downloads; the others wait, then read the files
            if dist.is_main:
                load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, download=True)
            dist.barrier()
        data: Dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size)
        arch = model_arch(cfg, data)
        model, report = build_model(arch)
        if report is not None:
            self.log(str(report))
        macs = count_macs(model, (1, data.in_chans, data.image_size, data.image_size))
        if cfg.pretrained:
            loaded = load_pretrained(model, cfg.pretrained)
            bad = nonfinite_tensors(model.state_dict())
            if bad:
                raise ValueError(f"--pretrained {cfg.pretrained} holds NaN or infinite values in {len(bad)} of the "
                                 f"tensors loaded (the first: {bad[0]}): it was saved by a run that diverged. Use "
                                 f"another checkpoint.")
            self.say(f"--pretrained {cfg.pretrained}: {loaded}")
        frozen_bn = _freeze_backbone(model, report, self.log) if cfg.freeze == "backbone" else []
        if cfg.sync_bn and dist.enabled:
            if self.device.type == "cpu":
                raise ValueError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on the CPU (gloo).")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device, memory_format=self.memory_format)

        train_loader = data.loader(True, cfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                   workers=cfg.workers)
        test_loader = data.loader(False, cfg.batch_size, rank=dist.rank, world_size=dist.world_size, workers=cfg.workers)
        optimizer = build_optimizer(model, cfg)
        training = Training(arch=arch, model=model, runner=model, trainable=[p for p in model.parameters() if p.requires_grad],
                            frozen_bn=frozen_bn, train_loader=train_loader, test_loader=test_loader, optimizer=optimizer,
                            schedule=build_schedule(optimizer, len(train_loader), cfg),
                            scaler=torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16"), macs=macs)
        if saved is not None:
            load_weights(model, saved["model"], self.run_dir / "last.pt")
            training.optimizer.load_state_dict(saved["optimizer"])
            training.schedule.load_state_dict(saved["schedule"])
            training.scaler.load_state_dict(saved["scaler"])
            torch.set_rng_state(saved["rng"])
            training.history, training.best = saved["history"], (saved["best_acc"], saved["best_epoch"])
            training.saved_epoch = saved["epoch"]
            self.log(f"resumed {self.run_dir} after epoch {training.saved_epoch}")

        if dist.enabled:
            training.runner = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if self.device.type == "cuda" else None)
        if cfg.compile:
            training.runner = torch.compile(training.runner)
        return training

    def train_epoch(self, training: Training, epoch: int) -> dict[str, float]:
        cfg, loader = self.config, training.train_loader
        training.runner.train()
        for bn in training.frozen_bn:
            bn.eval()
        loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)  # no per-step sync to find it
        seen = 0
        start = time.perf_counter()
        bar = _progress(self.batches(loader), self.verbose, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}")
        skipped = 0
        for step, (x, y) in enumerate(bar):
            with self.autocast():
                logits = training.runner(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            training.optimizer.zero_grad(set_to_none=True)
            if cfg.skip_nonfinite and not self._all_finite(loss):
                skipped += 1
                self._check_skip_budget(training, skipped, epoch, step)
                with warnings.catch_warnings():  # torch warns when the very first step is the skipped one
                    warnings.simplefilter("ignore", UserWarning)
                    training.schedule.step()  # the schedule follows the step count, skipped steps included
                continue
            training.scaler.scale(loss).backward()
            if cfg.clip_grad is not None:
                training.scaler.unscale_(training.optimizer)
                nn.utils.clip_grad_norm_(training.trainable, cfg.clip_grad)
            training.scaler.step(training.optimizer)
            training.scaler.update()
            training.schedule.step()
            loss_sum += loss.detach() * len(y)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        seconds = time.perf_counter() - start
        totals = self.dist.all_reduce_sum(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=self.device)]))
        loss, acc = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
        if not math.isfinite(loss):
            step = int(self.dist.all_reduce_min(torch.where(first_bad < 0, len(loader), first_bad)).item())
            raise self._stopped(training, f"the training loss became {loss} at step {step + 1} of epoch {epoch + 1} "
                                          f"(step {epoch * len(loader) + step + 1} of the run)")
        return {"train_loss": loss, "train_acc": acc, "epoch_seconds": seconds, **({"skipped": skipped} if cfg.skip_nonfinite else {})}

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite (one sync per step: --skip-nonfinite's cost); all skip together."""
        return bool(self.dist.all_reduce_min(torch.isfinite(loss.detach()).float().reshape(1)).item())

    def _check_skip_budget(self, training: Training, skipped: int, epoch: int, step: int) -> None:
        budget = self.config.skip_nonfinite
        total = skipped + sum(row.get("skipped", 0) for row in training.history)
        self.log(f"skipped step {step + 1} of epoch {epoch + 1}: non-finite loss ({total} of --skip-nonfinite {budget})")
        if total > budget:
            raise self._stopped(training, f"the training loss was not finite at step {step + 1} of epoch {epoch + 1}: "
                                          f"{total} non-finite losses in the run, more than --skip-nonfinite {budget}")

    def _stopped(self, training: Training, what: str) -> FloatingPointError:
        """The error a divergence stops the run with: what happened, what was kept, what to try."""
        kept = (f"{self.run_dir / 'last.pt'} keeps epoch {training.saved_epoch}, the last good one" if training.saved_epoch
                else "no epoch has ended with a finite network, so there is no checkpoint")
        return FloatingPointError(f"{what}; nothing of this epoch was saved and {kept}. "
                                  f"Lower --lr, add --clip-grad, or use --amp bf16 instead of fp16.")

    def _check_diverged(self, training: Training, epoch: int, row: dict[str, Any]) -> None:
        """The divergence guard, before an epoch is saved as good: the network's whole state (weights, BatchNorm
        statistics) and the test loss must be finite. A finite training loss does not show it: BatchNorm normalises
        with the batch's statistics while training, so a network whose running variances are infinite can train
        on, and predict one class in eval mode."""
        bad = nonfinite_tensors(training.model.state_dict())
        processes = int(self.dist.all_reduce_sum(torch.tensor([float(bool(bad))], device=self.device)).item())
        if processes:
            which = f"{len(bad)} of its tensors (the first: {bad[0]})" if bad else "tensors of another process"
            raise self._stopped(training, f"after epoch {epoch + 1} the network holds NaN or infinite values in {which}, "
                                          f"though the training loss was {row['train_loss']:.4g}")
        if not math.isfinite(row["test_loss"]):
            raise self._stopped(training, f"after epoch {epoch + 1} the test loss is {row['test_loss']}")

    @torch.no_grad()
    def evaluate(self, training: Training) -> dict[str, float]:
        training.runner.eval()
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        for x, y in self.batches(training.test_loader):
            with self.autocast():
                logits = training.runner(x)
            totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += len(y)
        totals = self.dist.all_reduce_sum(totals)
        return {"test_loss": (totals[0] / totals[2]).item(), "test_acc": (totals[1] / totals[2]).item()}

    def run(self) -> TrainResult:
        cfg, dist = self.config, self.dist
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        training = self.setup(self.resume_state())
        history = training.history
        logger = MetricsLogger(self.run_dir, cfg.tensorboard, history) if dist.is_main else None
        try:
            for epoch in range(training.saved_epoch, cfg.epochs):
                lr = training.optimizer.param_groups[0]["lr"]  # at the epoch's first step
                row = {"epoch": epoch + 1, **self.train_epoch(training, epoch), **self.evaluate(training), "lr": lr}
                self._check_diverged(training, epoch, row)
                history.append(row)
                improved = row["test_acc"] > training.best[0]
                if improved:
                    training.best = (row["test_acc"], epoch + 1)
                if dist.is_main:  # best.pt first, then last.pt, then what is derived from them
                    state = training.checkpoint(cfg, epoch + 1)
                    if improved:
                        save_checkpoint(self.run_dir / "best.pt", state)
                    save_checkpoint(self.run_dir / "last.pt", state)
                    logger.log(history)
                training.saved_epoch = epoch + 1
                self.log(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2%}  "
                         f"test {row['test_acc']:.2%}  ({row['epoch_seconds']:.1f} s)")
        finally:
            if logger is not None:
                logger.close()
        best_acc, best_epoch = training.best
        result = TrainResult(str(self.run_dir), cfg.variant, cfg.seed, history[-1]["test_acc"], best_acc, best_epoch,
                             count_params(training.model), training.macs, sum(r["epoch_seconds"] for r in history),
                             history, environment())
        if dist.is_main:
            write_json(self.run_dir / "result.json", {"config": cfg.to_dict(), **result.to_dict()})
        dist.barrier()
        return result


def train(config: TrainConfig) -> TrainResult:
    """Train one run as `config` says, on every process torchrun started (or on this one alone). `config.threads`
    holds for the run; the process's thread count is restored after it."""
    dist = setup_distributed(config.device)
    threads = torch.get_num_threads()
    try:
        run = _Run(config, dist)
        with RunFolderLock(run.run_dir) if dist.is_main else contextlib.nullcontext():
            return run.run()
    finally:
        torch.set_num_threads(threads)
        dist.close()
