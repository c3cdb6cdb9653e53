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


class _Run:
    """One training run's state; train() drives it."""

    def __init__(self, config: TrainConfig, dist: Distributed) -> None:
        self.config, self.dist = config, dist
        self.verbose = config.progress and dist.is_main
        self.run_dir = Path(config.run_dir or config.default_run_dir())
        self.device = dist.device
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
        self.saved_epoch = 0  # the epoch last.pt holds

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

    def batches(self, loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in loader:
            yield (x.to(self.device, non_blocking=True, memory_format=self.memory_format),
                   y.to(self.device, non_blocking=True))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        self.runner.train()
        for bn in self.frozen_bn:
            bn.eval()
        self.train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)  # no per-step sync to find it
        seen = 0
        start = time.perf_counter()
        bar = _progress(self.batches(self.train_loader), self.verbose, total=len(self.train_loader),
                        desc=f"epoch {epoch + 1}/{cfg.epochs}")
        skipped = 0
        for step, (x, y) in enumerate(bar):
            with self.autocast():
                logits = self.runner(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.skip_nonfinite and not self._all_finite(loss):
                skipped += 1
                self._check_skip_budget(skipped, epoch, step)
                with warnings.catch_warnings():  # torch warns when the very first step is the skipped one
                    warnings.simplefilter("ignore", UserWarning)
                    self.schedule.step()  # the schedule follows the step count, skipped steps included
                continue
            self.scaler.scale(loss).backward()
            if cfg.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.trainable, cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
            loss_sum += loss.detach() * len(y)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        seconds = time.perf_counter() - start
        totals = self.dist.all_reduce_sum(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=self.device)]))
        loss, acc = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
        if not math.isfinite(loss):
            step = int(self.dist.all_reduce_min(torch.where(first_bad < 0, len(self.train_loader), first_bad)).item())
            raise self._stopped(f"the training loss became {loss} at step {step + 1} of epoch {epoch + 1} (step "
                                f"{epoch * len(self.train_loader) + step + 1} of the run)")
        return {"train_loss": loss, "train_acc": acc, "epoch_seconds": seconds, **({"skipped": skipped} if cfg.skip_nonfinite else {})}

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite (one sync per step: --skip-nonfinite's cost); all skip together."""
        return bool(self.dist.all_reduce_min(torch.isfinite(loss.detach()).float().reshape(1)).item())

    def _check_skip_budget(self, skipped: int, epoch: int, step: int) -> None:
        total = skipped + sum(row.get("skipped", 0) for row in self.history)
        self.log(f"skipped step {step + 1} of epoch {epoch + 1}: non-finite loss ({total} of --skip-nonfinite {self.config.skip_nonfinite})")
        if total > self.config.skip_nonfinite:
            raise self._stopped(f"the training loss was not finite at step {step + 1} of epoch {epoch + 1}: {total} "
                                f"non-finite losses in the run, more than --skip-nonfinite {self.config.skip_nonfinite}")

    def _stopped(self, what: str) -> FloatingPointError:
        """The error a divergence stops the run with: what happened, what was kept, what to try."""
        kept = (f"{self.run_dir / 'last.pt'} keeps epoch {self.saved_epoch}, the last good one" if self.saved_epoch
                else "no epoch has ended with a finite network, so there is no checkpoint")
        return FloatingPointError(f"{what}; nothing of this epoch was saved and {kept}. "
                                  f"Lower --lr, add --clip-grad, or use --amp bf16 instead of fp16.")

    def _check_diverged(self, epoch: int, row: dict[str, Any]) -> None:
        """The divergence guard, before an epoch is saved as good: the network's whole state (weights, BatchNorm
        statistics) and the test loss must be finite. A finite training loss does not show it: BatchNorm normalises
        with the batch's statistics while training, so a network whose running variances are infinite can train
        on, and predict one class in eval mode."""
        bad = nonfinite_tensors(self.model.state_dict())
        processes = int(self.dist.all_reduce_sum(torch.tensor([float(bool(bad))], device=self.device)).item())
        if processes:
            which = f"{len(bad)} of its tensors (the first: {bad[0]})" if bad else "tensors of another process"
            raise self._stopped(f"after epoch {epoch + 1} the network holds NaN or infinite values in {which}, "
                                f"though the training loss was {row['train_loss']:.4g}")
        if not math.isfinite(row["test_loss"]):
            raise self._stopped(f"after epoch {epoch + 1} the test loss is {row['test_loss']}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.runner.eval()
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        for x, y in self.batches(self.test_loader):
            with self.autocast():
                logits = self.runner(x)
            totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += len(y)
        totals = self.dist.all_reduce_sum(totals)
        return {"test_loss": (totals[0] / totals[2]).item(), "test_acc": (totals[1] / totals[2]).item()}

    def state(self, epoch: int, history: list[dict[str, Any]], best: tuple[float, int]) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "arch": self.arch,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": history,
            "best_acc": best[0],
            "best_epoch": best[1],
            "environment": environment(),
        }

    def run(self) -> TrainResult:
        cfg, dist = self.config, self.dist
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        saved = self.resume_state()
        seed_everything(cfg.seed)
        if cfg.download:  # one process downloads; the others wait, then read the files
            if dist.is_main:
                load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, download=True)
            dist.barrier()
        data: Dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size)
        self.arch = model_arch(cfg, data)
        self.model, report = build_model(self.arch)
        if report is not None:
            self.log(str(report))
        macs = count_macs(self.model, (1, data.in_chans, data.image_size, data.image_size))
        if cfg.pretrained:
            loaded = load_pretrained(self.model, cfg.pretrained)
            bad = nonfinite_tensors(self.model.state_dict())
            if bad:
                raise ValueError(f"--pretrained {cfg.pretrained} holds NaN or infinite values in {len(bad)} of the "
                                 f"tensors loaded (the first: {bad[0]}): it was saved by a run that diverged. Use "
                                 f"another checkpoint.")
            self.say(f"--pretrained {cfg.pretrained}: {loaded}")
        self.frozen_bn = _freeze_backbone(self.model, report, self.log) if cfg.freeze == "backbone" else []
        if cfg.sync_bn and dist.enabled:
            if self.device.type == "cpu":
                raise ValueError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on the CPU (gloo).")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device, memory_format=self.memory_format)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        self.train_loader = data.loader(True, cfg.batch_size, seed=cfg.seed, rank=dist.rank,
                                        world_size=dist.world_size, workers=cfg.workers)
        self.test_loader = data.loader(False, cfg.batch_size, rank=dist.rank, world_size=dist.world_size,
                                       workers=cfg.workers)
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = build_schedule(self.optimizer, len(self.train_loader), cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        history: list[dict[str, Any]] = []
        best, start_epoch = (-1.0, 0), 0
        if saved is not None:
            load_weights(self.model, saved["model"], self.run_dir / "last.pt")
            self.optimizer.load_state_dict(saved["optimizer"])
            self.schedule.load_state_dict(saved["schedule"])
            self.scaler.load_state_dict(saved["scaler"])
            torch.set_rng_state(saved["rng"])
            history, best, start_epoch = saved["history"], (saved["best_acc"], saved["best_epoch"]), saved["epoch"]
            self.saved_epoch = start_epoch
            self.log(f"resumed {self.run_dir} after epoch {start_epoch}")

        self.runner: nn.Module = self.model
        if dist.enabled:
            self.runner = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.local_rank] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.runner = torch.compile(self.runner)

        self.history = history  # the skip budget counts the epochs before a resume too
        logger = MetricsLogger(self.run_dir, cfg.tensorboard, history) if dist.is_main else None
        try:
            for epoch in range(start_epoch, cfg.epochs):
                lr = self.optimizer.param_groups[0]["lr"]  # at the epoch's first step
                row = {"epoch": epoch + 1, **self.train_epoch(epoch), **self.evaluate(), "lr": lr}
                self._check_diverged(epoch, row)
                history.append(row)
                improved = row["test_acc"] > best[0]
                if improved:
                    best = (row["test_acc"], epoch + 1)
                if dist.is_main:  # best.pt first, then last.pt, then what is derived from them
                    state = self.state(epoch + 1, history, best)
                    if improved:
                        save_checkpoint(self.run_dir / "best.pt", state)
                    save_checkpoint(self.run_dir / "last.pt", state)
                    logger.log(history)
                self.saved_epoch = epoch + 1
                self.log(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2%}  "
                         f"test {row['test_acc']:.2%}  ({row['epoch_seconds']:.1f} s)")
        finally:
            if logger is not None:
                logger.close()
        result = TrainResult(str(self.run_dir), cfg.variant, cfg.seed, history[-1]["test_acc"], best[0], best[1],
                             count_params(self.model), macs, sum(r["epoch_seconds"] for r in history), history,
                             environment())
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
