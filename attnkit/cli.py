"""The `attnkit` command; each subcommand is a thin layer over the library."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import typing
from dataclasses import fields
from typing import Any, Sequence

import torch

from . import registry
from .deploy import FORMATS

_COMPARE_OWN = {"attn", "where", "seed", "run_dir", "resume", "progress"}


def _add_train_options(parser: argparse.ArgumentParser, skip: set[str] = set()) -> None:
    from .train import TrainConfig
    from .runs import CHOICES

    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        kwargs: dict[str, Any] = {"default": f.default, "help": f.metadata["help"].replace("%", "%%")}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "milestones":
            kwargs.update(type=int, nargs="*", default=())
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            kwargs["type"] = base
            if f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name]
        if f.default is not None and not isinstance(f.default, bool) and f.default != ():
            kwargs["help"] += " (default: %(default)s)"
        parser.add_argument(flag, **kwargs)


def _config(args: argparse.Namespace, **overrides: Any) -> Any:
    from .train import TrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**{**values, **overrides})


def split_specs(text: str) -> list[str]:
    """Split 'se,cbam(reduction=8, kernel_size=3),eca' at the commas outside parentheses."""
    specs, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            specs.append(current.strip())
            current = ""
        else:
            current += char
    specs.append(current.strip())
    return [s for s in specs if s and s != registry.BASELINE]


def _seeds(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (5) or a list (0,3,7), got {text!r}") from None
    return values if "," in text else list(range(values[0]))


class _Repeatable(argparse.Action):
    """action="append", except that the first value given replaces the default (a study file's list)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, ([] if items is None or items is self.default else list(items)) + [values])


def _sbatch_option(text: str) -> tuple[str, str | bool]:
    key, _, value = text.partition("=")
    if not key.strip():
        raise argparse.ArgumentTypeError(f"--sbatch takes KEY=VALUE (qos=high) or a flag (exclusive), got {text!r}")
    return key.strip(), value.strip() if "=" in text else True


def _time_limit(text: str) -> int:
    from .train.slurm import parse_time

    try:
        return parse_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_launcher_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="STUDY.toml",
                        help="a study file: the comparison's options as TOML; options given here override it")
    parser.add_argument("--launcher", default="local", choices=["local", "submitit"],
                        help="local: processes on this machine (--jobs); submitit: a Slurm job per run, through "
                             "submitit (pip install 'attnkit[slurm]') (default: %(default)s)")
    slurm = parser.add_argument_group("jobs (--launcher submitit)")
    slurm.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                       help="slurm: a job array; local: submitit's local processes, debug: this process, to try a "
                            "configuration on this machine (default: %(default)s)")
    slurm.add_argument("--partition", default=None, help="Slurm partition")
    slurm.add_argument("--account", default=None, help="Slurm account")
    slurm.add_argument("--gpus-per-run", type=int, default=1,
                       help="GPUs of each run; several: one process per GPU on one node, DDP (default: %(default)s)")
    slurm.add_argument("--cpus-per-run", type=int, default=None, help="CPUs of each run (default: the cluster's)")
    slurm.add_argument("--mem-gb", type=float, default=None, help="memory of each run in GB (default: the cluster's)")
    slurm.add_argument("--time", type=_time_limit, default="24:00:00",
                       help="time limit of each job, minutes or [D-]HH:MM:SS; a run that needs longer is requeued "
                            "and resumes from its checkpoint (default: %(default)s)")
    slurm.add_argument("--array-parallelism", type=int, default=None,
                       help="runs at once (default: as many as the cluster gives; locally up to 4 on CPU, 1 on GPU)")
    slurm.add_argument("--sbatch", action=_Repeatable, type=_sbatch_option, default=None, metavar="KEY=VALUE",
                       help="a further sbatch option, e.g. qos=high or constraint=a100 (repeat for several)")
    slurm.add_argument("--setup", action=_Repeatable, default=None, metavar="LINE",
                       help="a shell line the job script runs first, e.g. 'module load cuda' (repeat for several)")


def _launcher(args: argparse.Namespace) -> Any:
    from .train.slurm import SlurmOptions, SubmititLauncher

    options = SlurmOptions(
        cluster=args.cluster, partition=args.partition, account=args.account, gpus_per_run=args.gpus_per_run,
        cpus_per_run=args.cpus_per_run, mem_gb=args.mem_gb, time=args.time, array_parallelism=args.array_parallelism,
        sbatch=dict(args.sbatch or []), setup=tuple(args.setup or ()))
    if args.launcher == "local":
        given = [f.name for f in fields(SlurmOptions) if getattr(options, f.name) != getattr(SlurmOptions(), f.name)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is an option of --launcher submitit: add --launcher "
                             "submitit to run the comparison as jobs, or leave it out to train here.")
        return None
    if args.jobs is not None:
        raise ValueError("--jobs is for --launcher local; with --launcher submitit, --array-parallelism says how many "
                         "runs run at once.")
    return SubmititLauncher(options)


def _resolved_study(args: argparse.Namespace) -> dict[str, Any]:
    """The comparison's options after the study file and the command line, as a study file holds them."""
    from .train import TrainConfig

    study: dict[str, Any] = {"attn": split_specs(args.attn), "where": args.where or ["auto"], "seeds": args.seeds,
                             "out": args.out, "launcher": args.launcher}
    if args.launcher == "local":
        study["jobs"] = args.jobs or _default_jobs()
    study["train"] = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in _COMPARE_OWN}
    if args.launcher == "submitit":
        study["slurm"] = {name: getattr(args, name) for name in ("cluster", "partition", "account", "gpus_per_run",
                                                                 "cpus_per_run", "mem_gb", "time", "array_parallelism")}
        study["slurm"].update(sbatch=dict(args.sbatch or []) or None, setup=args.setup)
    return study


def _default_jobs() -> int:
    return 1 if torch.cuda.is_available() else max(1, min(4, os.cpu_count() or 1))


def smoke(channels: int = 128, size: tuple[int, int] = (9, 7), batch: int = 4) -> list[dict[str, object]]:
    """Build every registered module, run it forward and backward on random input, and report each."""
    torch.manual_seed(0)
    rows = []
    for name in registry.list_modules():
        module = registry.create(name, channels)
        x = torch.randn(batch, channels, *size, requires_grad=True)
        start = time.perf_counter()
        y = module(x)
        y.square().mean().backward()
        elapsed = time.perf_counter() - start
        finite = bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all())
        rows.append({"module": name, "class": type(module).__name__, "params": sum(p.numel() for p in module.parameters()),
                     "output": "×".join(map(str, y.shape)), "finite": finite, "ms": 1e3 * elapsed})
    return rows


def _print_table(rows: list[dict[str, object]]) -> None:
    from .analysis.report import text_table

    print(text_table([{h: f"{v:.1f}" if isinstance(v, float) else str(v) for h, v in r.items()} for r in rows]))


def _checkpoint_command(sub: Any, name: str, help: str, dataset: str | None = None) -> argparse.ArgumentParser:
    """A subcommand that reads a training checkpoint, and, given the help of its --dataset, looks at it with data."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("checkpoint", help="a checkpoint written by attnkit train (e.g. runs/<run>/last.pt)")
    if dataset is not None:
        parser.add_argument("--dataset", default=None, help=f"{dataset} (default: the checkpoint's)")
        parser.add_argument("--data-dir", default=None, help="where the data set's files are (default: the checkpoint's training --data-dir)")
    return parser


def _parser(compare_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command's parser; `compare_defaults` (a study file's options) replace compare's defaults."""
    from .compare import DEFAULT_STUDY

    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered attention modules, backbones and data sets")
    p_smoke = sub.add_parser("smoke", help="build every module and run it forward and backward")
    p_smoke.add_argument("--channels", type=int, default=128,
                         help="channels (default: %(default)s, which every module takes at its defaults: SK's 32 "
                              "groups, Shuffle Attention's 2×64, SGE's 64)")

    p_train = sub.add_parser("train", help="train one network (torchrun for several processes)")
    _add_train_options(p_train)

    p_compare = sub.add_parser("compare", help="the plain network against attention variants over paired seeds")
    p_compare.add_argument("--attn", default="se,cbam,eca,srm,coord", help="attention specs, comma-separated (default: %(default)s)")
    p_compare.add_argument("--where", action=_Repeatable, default=None,
                           help="a placement to compare (repeat to compare several); default: auto, the paper's")
    p_compare.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="a count (5) or a list (0,3,7) (default: 3)")
    p_compare.add_argument("--out", default=None, help="the comparison's folder (default runs/compare-<model>-<dataset>); "
                           "running again with the same folder resumes")
    p_compare.add_argument("--jobs", type=int, default=None, help="runs trained at once (default: up to 4 on CPU, 1 on GPU)")
    p_compare.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_train_options(p_compare, skip=_COMPARE_OWN)
    _add_launcher_options(p_compare)
    # the default study: the embedded task where the plain network is below its ceiling, trained until the test accuracy
    # stops rising (docs/cluttered-digits.md)
    p_compare.set_defaults(**{**DEFAULT_STUDY, **(compare_defaults or {})})

    p_profile = sub.add_parser("profile", help="parameters, FLOPs, activation memory and latency, plain and with attention")
    p_profile.add_argument("--model", required=True, help="backbone name (attnkit.list_models())")
    p_profile.add_argument("--attn", default="se,cbam,eca,srm,coord", help="attention specs, comma-separated (default: %(default)s)")
    p_profile.add_argument("--input-size", type=int, default=None,
                           help="input side (default: 224 for the ImageNet ResNets and mobilenet_v2, 32 for resnet20-110, 28 for lenet)")
    p_profile.add_argument("--batch-size", type=int, default=8, help="batch of the memory and latency measurements (default: %(default)s)")
    p_profile.add_argument("--in-chans", type=int, default=None, help="input channels (default: the backbone's)")
    p_profile.add_argument("--num-classes", type=int, default=None, help="classes (default: the backbone's)")
    p_profile.add_argument("--warmup", type=int, default=3, help="untimed passes per variant (default: %(default)s)")
    p_profile.add_argument("--repeats", type=int, default=10, help="timed passes per variant; the median is reported (default: %(default)s)")

    p_export = _checkpoint_command(sub, "export", "export a trained checkpoint to ONNX, torch.export or TorchScript, and check it")
    p_export.add_argument("--format", default="onnx", choices=list(FORMATS),
                          help="onnx (checked with onnxruntime), exported-program (torch.export, .pt2) or torchscript "
                               "(default: %(default)s)")
    p_export.add_argument("--out", default=None, help="the file to write (default: the checkpoint's path with the format's suffix)")
    p_export.add_argument("--dynamic-batch", action="store_true", help="let the batch size vary")
    p_export.add_argument("--dynamic-size", action="store_true", help="let the image height and width vary")
    p_export.add_argument("--input-size", type=int, default=None, help="the example's side (default: the training size)")
    p_export.add_argument("--batch-size", type=int, default=1, help="the example's batch (default: %(default)s)")
    p_export.add_argument("--no-fold", dest="fold", action="store_false", help="keep the BatchNorms (default: folded)")
    p_export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p_export.add_argument("--tolerance", type=float, default=1e-4,
                          help="largest relative error of the check against PyTorch (default: %(default)s)")

    p_explain = _checkpoint_command(sub, "explain", "Grad-CAM of the attention and the plain model side by side, and the attention "
                                    "maps, as PNG grids", dataset="explain the first --count test images of this data set")
    p_explain.add_argument("--images", nargs="+", default=None, metavar="FILE", help="image files to explain (predicted labels only)")
    p_explain.add_argument("--baseline", default=None, metavar="CKPT",
                           help="the plain model's checkpoint (default: <compare folder>/plain/seed<k>/ for runs of attnkit compare)")
    p_explain.add_argument("--method", default="gradcam", choices=["gradcam", "gradcam++"], help="(default: %(default)s)")
    p_explain.add_argument("--count", type=int, default=8, help="test images to explain (default: %(default)s)")
    p_explain.add_argument("--target-layer", default=None, help="the module Grad-CAM looks at (default: the last feature map before global pooling)")
    p_explain.add_argument("--sites", default="last",
                           help="spatial attention sites drawn: last, all, or names, e.g. layer1.2.attn,layer3.2.attn (default: %(default)s)")
    p_explain.add_argument("--out", default=None, help="the folder to write to (default: <checkpoint's folder>/explain)")

    p_stats = _checkpoint_command(sub, "stats", "channel-gate statistics of a checkpoint: mean excitation per class (SE paper) "
                                  "and correlations of the channel weights (SRM paper), as CSV and PNG",
                                  dataset="data set whose test split is used")
    p_stats.add_argument("--out", default=None, help="the folder to write to (default: <checkpoint's folder>/stats)")
    p_stats.add_argument("--max-samples", type=int, default=None, help="use this many test images, evenly spaced (default: all)")

    p_prune = _checkpoint_command(sub, "prune", "zero the channels with the lowest mean gate at each attention site: accuracy "
                                  "against the fraction zeroed, with random and L1-norm rankings",
                                  dataset="data set: gates ranked on its training split, accuracy on its test split")
    p_prune.add_argument("--fractions", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                         help="fractions of each site's channels to zero, in [0, 1) (default: %(default)s)")
    p_prune.add_argument("--seed", type=int, default=0, help="seed of the random rankings (default: %(default)s)")
    p_prune.add_argument("--max-samples", type=int, default=None, help="training images the gates are averaged over, evenly spaced (default: all)")
    p_prune.add_argument("--out", default=None, help="the folder to write to (default: <checkpoint's folder>/prune)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "compare" and args.config:
            from .train.study import read_study

            args = _parser(read_study(args.config)).parse_args(argv)
        return _dispatch(args, argv)
    except (ValueError, TypeError, OSError, FloatingPointError) as error:
        from .files import os_error_message

        message = os_error_message(error) if isinstance(error, OSError) else str(error)
        message = message.removeprefix(f"{args.command}: ")  # the library names the function; the prefix says it
        print(f"attnkit {args.command}: error: {message}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.command == "list":
        from .data import list_datasets
        from .models import list_models

        print("modules:  " + ", ".join(registry.list_modules()))
        print("models:   " + ", ".join(list_models()))
        print("datasets: " + ", ".join(list_datasets()))
        return 0
    if args.command == "train":
        from .train import train

        result = train(_config(args))
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{result.variant}: test accuracy {result.test_acc:.2%} after {len(result.history)} epochs "
                  f"(best {result.best_acc:.2%} at epoch {result.best_epoch}); run folder {result.run_dir}")
        return 0
    if args.command == "compare":
        from .compare import compare
        from .train.slurm import Interrupted, RunsFailed

        command = "attnkit " + shlex.join(sys.argv[1:] if argv is None else list(argv))
        launcher = _launcher(args)
        try:
            result = compare(_config(args), split_specs(args.attn), args.seeds, args.where or ["auto"], args.out,
                             1 if launcher else args.jobs or _default_jobs(), args.progress, command, launcher,
                             _resolved_study(args))
        except (RunsFailed, Interrupted) as error:
            print(f"attnkit compare: {error}", file=sys.stderr)
            return 130 if isinstance(error, Interrupted) else 1
        print(result.table())
        print(f"\n{result.guardrails()}")
        found = len(result.runs) - result.trained
        print(f"\n{len(result.runs)} runs ({found} found finished in the folder); report, CSV, JSON and plots in {result.out_dir}")
        return 0
    if args.command == "profile":
        from .analysis.profile import format_profile, profile

        print(format_profile(profile(args.model, split_specs(args.attn), input_size=args.input_size, batch_size=args.batch_size,
                                     in_chans=args.in_chans, num_classes=args.num_classes, warmup=args.warmup, repeats=args.repeats)))
        return 0
    if args.command == "export":
        from .deploy import export

        print(export(args.checkpoint, args.out, args.format, input_shape=args.input_size, batch_size=args.batch_size,
                     dynamic_batch=args.dynamic_batch, dynamic_size=args.dynamic_size, fold=args.fold, opset=args.opset,
                     tolerance=args.tolerance))
        return 0
    if args.command == "explain":
        from .analysis.explain import explain

        print(explain(args.checkpoint, images=args.images, dataset=args.dataset, data_dir=args.data_dir, baseline=args.baseline,
                      method=args.method, count=args.count, out_dir=args.out, target_layer=args.target_layer, sites=args.sites))
        return 0
    if args.command == "stats":
        from .analysis.gate_stats import gate_stats, write_gate_stats
        from .runs import load_run

        run = load_run(args.checkpoint, args.dataset, args.data_dir)
        stats = gate_stats(run.model, run.data, max_samples=args.max_samples)
        paths = write_gate_stats(stats, args.out or run.folder / "stats", run.name)
        print(f"{stats.table()}\n\nCSV and plots in {paths[0].parent}: {', '.join(p.name for p in paths)}")
        return 0
    if args.command == "prune":
        from .runs import load_run
        from .analysis.prune import parse_fractions, prune, write_prune

        fractions = parse_fractions(args.fractions)
        run = load_run(args.checkpoint, args.dataset, args.data_dir)
        result = prune(run.model, run.data, fractions, seed=args.seed, max_samples=args.max_samples)
        paths = write_prune(result, args.out or run.folder / "prune", run.name)
        print(f"{result.table()}\n\nCSV and plot in {paths[0].parent}: {', '.join(p.name for p in paths)}")
        return 0
    rows = smoke(args.channels)
    _print_table(rows)
    failed = [r["module"] for r in rows if not r["finite"]]
    if failed:
        print(f"non-finite output or gradient: {', '.join(failed)}")
        return 1
    print(f"{len(rows)} modules built and ran forward and backward.")
    return 0
