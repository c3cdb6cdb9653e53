"""The cluttered-digits study: how hard the task is at each clutter level (the plain network's accuracy), which
is the evidence for the defaults of `attnkit compare`.

    python studies/cluttered_digits.py sweep [--fragments 0 2 4 8] [--canvas 24] [--seeds 2] [--epochs 10]

prints a markdown table of the plain ResNet-20's test accuracy (mean ± std over seeds) per setting and writes
it, with every run, under runs/study-cluttered/. The comparison itself is `attnkit compare` (see
docs/cluttered-digits.md for the command and its table).
"""
from __future__ import annotations

import argparse
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from attnkit.train import TrainConfig, train


def run(config: TrainConfig) -> tuple[str, int, float, float]:
    result = train(config)
    return config.dataset, config.seed, result.test_acc, result.train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sweep"])
    parser.add_argument("--fragments", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--canvas", type=int, nargs="+", default=[24])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="runs/study-cluttered")
    args = parser.parse_args()
    configs = []
    for canvas in args.canvas:
        for fragments in args.fragments:
            dataset = f"cluttered-digits(canvas={canvas}, fragments={fragments}, samples={args.samples})"
            for seed in range(args.seeds):
                configs.append(TrainConfig(model=args.model, dataset=dataset, epochs=args.epochs, seed=seed,
                                           progress=False, tensorboard=False, resume=True, threads=1,
                                           run_dir=f"{args.out}/c{canvas}-f{fragments}-n{args.samples}-e{args.epochs}/seed{seed}"))
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(run, configs))
    lines = [f"plain {args.model}, {args.epochs} epochs, {args.samples} training images, {args.seeds} seeds",
             "", "| data set | test accuracy % (mean ± std) | s/run |", "|---|---|---|"]
    for dataset in dict.fromkeys(r[0] for r in results):
        accs = [100 * r[2] for r in results if r[0] == dataset]
        secs = [r[3] for r in results if r[0] == dataset]
        spread = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        lines.append(f"| `{dataset}` | {statistics.mean(accs):.2f} ± {spread:.2f} | {statistics.mean(secs):.0f} |")
    print("\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
