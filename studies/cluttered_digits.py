"""The cluttered-digits study: how hard the task is at each clutter level (the plain network's accuracy), which
is the evidence for the defaults of `attnkit compare`, and whether its conclusions depend on the CPU's kernels.

    python studies/cluttered_digits.py sweep [--fragments 0 1 2 3 4 6] [--canvas 20] [--seeds 2] [--epochs 10]
    python studies/cluttered_digits.py maps CHECKPOINT [--images 8] [--figure docs/cluttered-cbam-maps.png]
    python studies/cluttered_digits.py agree COMPARISON COMPARISON

`sweep` prints a markdown table of the plain ResNet-20's test accuracy (mean ± std over seeds) per setting and
writes it, with every run, under runs/study-cluttered/. `maps` draws CBAM's spatial attention at the last block
of each stage of a trained checkpoint on test images, with the placed digit's box. `agree` sets two folders of
`attnkit compare` side by side (the same comparison run with two kernel sets, say): each variant's mean with its 95%
interval in both, whether each mean lies in the other's interval, and whether the verdicts are the same. The
comparison itself is `attnkit compare` (see docs/cluttered-digits.md for the command and its table).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from attnkit.train import TrainConfig, train


def run(config: TrainConfig) -> tuple[str, int, float, float]:
    result = train(config)
    return config.dataset, config.seed, result.test_acc, result.train_seconds


def attention_maps(checkpoint: str, images: int, figure: str) -> None:
    """CBAM's spatial map Ms (the output of each `spatial_gate`) at the last block of every stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from attnkit import kernels
    from attnkit.data import load_dataset
    from attnkit.data.cluttered import make_cluttered
    from attnkit.data.datasets import _digit_split
    from attnkit.registry import parse_spec
    from attnkit.train import load_checkpoint, model_from_checkpoint

    config = load_checkpoint(checkpoint)["config"]
    name, knobs = parse_spec(config["dataset"], "dataset spec")
    if name != "cluttered-digits":
        raise SystemExit(f"{checkpoint} was trained on {config['dataset']}, not cluttered-digits")
    model = model_from_checkpoint(checkpoint)
    data = load_dataset(config["dataset"])
    x, y = next(iter(data.loader(False, images)))
    # the test split's generator call, repeated for the digits' boxes
    sources, labels, _, test_idx = _digit_split()
    data_seed = knobs.get("seed", 0)
    knobs = {k: v for k, v in knobs.items() if k not in ("samples", "test_samples", "seed", "image_size", "fresh")}
    split = make_cluttered(sources[test_idx].numpy(), labels[test_idx].numpy(), len(data.test[1]),
                           seed=2 * data_seed + 1, **knobs)
    assert torch.equal(torch.from_numpy(split.images[:images]), data.test[0][:images, 0]), "regenerated split differs"
    stages = [n for n, m in model.named_modules() if n.endswith("spatial_gate")]
    last_per_stage = [[n for n in stages if n.startswith(f"layer{i}.")][-1] for i in (1, 2, 3)]
    maps: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: maps.__setitem__(n, o.detach()))
             for n in last_per_stage]
    with torch.no_grad(), kernels.use("reference"):  # the fused path computes Ms without calling spatial_gate
        predicted = model(x).argmax(1)
    for h in hooks:
        h.remove()
    fig, axes = plt.subplots(len(last_per_stage) + 1, images, figsize=(1.6 * images, 1.7 * (len(last_per_stage) + 1)))
    for i in range(images):
        top, left, side = split.boxes[i]
        axes[0, i].imshow(split.images[i], cmap="gray")
        axes[0, i].add_patch(plt.Rectangle((left - 0.5, top - 0.5), side, side, fill=False, color="lime", lw=1))
        axes[0, i].set_title(f"true {y[i].item()} / pred {predicted[i].item()}", fontsize=7)
        for row, site in enumerate(last_per_stage, start=1):
            axes[row, i].imshow(maps[site][i, 0].numpy(), cmap="inferno", vmin=0, vmax=1)
            if i == 0:
                axes[row, i].set_ylabel(site.replace(".spatial_gate", ""), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("CBAM spatial attention Ms on cluttered test digits (digit box in green)", fontsize=9)
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    print(f"wrote {figure}")


def agreement(folders: list[str]) -> str:
    """A markdown table: per variant, mean ± 95% interval of the test accuracy in each comparison folder, whether each
    mean lies in the other's interval, and the verdicts."""
    from scipy import stats

    summaries = [{row["variant"]: row for row in json.loads((Path(f) / "results.json").read_text())["summary"]}
                 for f in folders]
    environments = [json.loads((Path(f) / "results.json").read_text()).get("environments", []) for f in folders]

    def interval(row: dict) -> tuple[float, float]:
        half = stats.t.ppf(0.975, row["seeds"] - 1) * row["acc_std"] / math.sqrt(row["seeds"])
        return 100 * row["acc_mean"], 100 * half

    kernels = [", ".join(sorted({e.get("cpu_kernels", "?") + (f" (oneDNN {e['onednn_max_isa']})" if "onednn_max_isa" in e
                                  else "") for e in envs})) for envs in environments]
    lines = [f"| variant | {kernels[0]}: mean [95% CI] | {kernels[1]}: mean [95% CI] | each mean in the other's interval "
             f"| verdicts |", "|---|---|---|---|---|"]
    for variant in summaries[0]:
        (a, ha), (b, hb) = interval(summaries[0][variant]), interval(summaries[1][variant])
        verdicts = [s[variant].get("verdict", "baseline") for s in summaries]
        lines.append(f"| {variant} | {a:.2f} [{a - ha:.2f}, {a + ha:.2f}] | {b:.2f} [{b - hb:.2f}, {b + hb:.2f}] | "
                     f"{'yes' if abs(a - b) <= min(ha, hb) else 'no'} | "
                     f"{verdicts[0] if verdicts[0] == verdicts[1] else ' / '.join(verdicts)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sweep", "maps", "agree"])
    parser.add_argument("checkpoint", nargs="*", help="for maps: a CBAM model trained on cluttered-digits; for agree: "
                                                      "two folders of attnkit compare")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--figure", default="docs/cluttered-cbam-maps.png")
    parser.add_argument("--fragments", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6])
    parser.add_argument("--canvas", type=int, nargs="+", default=[20])
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="runs/study-cluttered")
    args = parser.parse_args()
    if args.what == "maps":
        if len(args.checkpoint) != 1:
            parser.error("maps needs one CHECKPOINT")
        attention_maps(args.checkpoint[0], args.images, args.figure)
        return
    if args.what == "agree":
        if len(args.checkpoint) != 2:
            parser.error("agree needs two folders of attnkit compare")
        print(agreement(args.checkpoint))
        return
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
