"""The trainer's overhead: images/s of `attnkit.train.train` against a minimal hand-written PyTorch loop on the
same model, data and optimiser, measured alternately in one run (median of the repeats).

    python benchmarks/train_overhead.py [--model resnet20 --attn se --epochs 2 --repeats 3]

Two figures: the training loop alone (the trainer's epoch time: batches, forward, backward, step, schedule,
progress bar and metrics) and the whole run (plus evaluation, CSV/TensorBoard logs, the atomic checkpoint
writes of every epoch, and for the trainer its set-up too, which the hand loop's figure leaves out).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from attnkit.data import load_dataset
from attnkit.train import TrainConfig, build_model, seed_everything, train
from attnkit.runs import model_arch
from attnkit.train.optim import build_optimizer, build_schedule
from timing import cpu_name  # benchmarks/timing.py, beside this script


def hand_loop(config: TrainConfig) -> tuple[float, float, int]:
    """What a user would write: shuffle, index, normalise, forward, loss, backward, step. Returns (train seconds,
    train + evaluation seconds, images trained)."""
    seed_everything(config.seed)
    data = load_dataset(config.dataset, image_size=config.image_size)
    model, _ = build_model(model_arch(config, data))
    optimizer = build_optimizer(model, config)
    images, labels = data.train
    steps = len(labels) // config.batch_size
    schedule = build_schedule(optimizer, steps, config)
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    train_seconds = total_seconds = 0.0
    for _ in range(config.epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(labels))
        for step in range(steps):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            x = (images[idx].float() / 255 - mean) / std
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        train_seconds += time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            test_images, test_labels = data.test
            for i in range(0, len(test_labels), config.batch_size):
                (model((test_images[i:i + config.batch_size].float() / 255 - mean) / std).argmax(1) == test_labels[i:i + config.batch_size]).sum()
        total_seconds += time.perf_counter() - start
    return train_seconds, total_seconds, steps * config.batch_size * config.epochs


def trainer_run(config: TrainConfig) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        result = train(TrainConfig(**{**config.to_dict(), "run_dir": run_dir}))
        elapsed = time.perf_counter() - start
    images = len(result.history) * (2048 // config.batch_size) * config.batch_size
    # the whole call, set-up included (data, model, FLOP count); the hand loop's total leaves its set-up out
    return result.train_seconds, elapsed, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--attn", default="se")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = TrainConfig(model=args.model, attn=args.attn, dataset="synthetic(samples=2048, test_samples=512)",
                         image_size=32, epochs=args.epochs, batch_size=args.batch_size, progress=True,
                         tensorboard=True, threads=torch.get_num_threads())
    hand, ours = [], []
    for _ in range(args.repeats):
        hand.append(hand_loop(config))
        ours.append(trainer_run(config))
    rate = lambda runs, i: statistics.median(r[2] / r[i] for r in runs)  # noqa: E731
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.model} + {args.attn}, synthetic 3×32×32, batch {args.batch_size}, {args.epochs} epochs × {args.repeats} repeats (median)")
    print("| measure | hand-written loop (img/s) | attnkit train (img/s) | trainer overhead |")
    print("|---|---|---|---|")
    for label, i in (("training loop", 0), ("whole run incl. eval, logs, checkpoints", 1)):
        h, o = rate(hand, i), rate(ours, i)
        print(f"| {label} | {h:.0f} | {o:.0f} | {100 * (h / o - 1):+.1f}% |")


if __name__ == "__main__":
    main()
