"""Inference latency of a backbone with each attention module, as deployed: PyTorch eager, PyTorch after
attnkit.fuse (BatchNorms folded), and onnxruntime on the file attnkit.export writes, in one run.

    python benchmarks/deploy_latency.py [--model resnet50 --size 224 --batch 1 --repeats 20] [--attn se,eca,cbam]
        [--threads N] [--clock wall|cpu] [--ort-profile]

All the variants' runtimes take turns, run by run, and the median is reported, with each variant's overhead over
plain in each runtime; the last column gives the export check's largest relative error against the unfolded PyTorch
model. --ort-profile then runs each ONNX file `--repeats` more times under onnxruntime's profiler and prints the
kernel time per run by operator type (after onnxruntime's graph optimisations, which on x86 rewrite the convolutions
to its blocked NCHWc layout and insert the reorders to and from it). CPU only.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import onnxruntime
import torch

import attnkit
from attnkit.registry import BASELINE
from timing import CLOCKS, cpu_name, load, median_ms  # benchmarks/timing.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--attn", default=",".join(attnkit.list_modules()), help="comma-separated module names")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS), help="wall clock or process CPU time")
    parser.add_argument("--ort-profile", action="store_true", help="also onnxruntime's kernel time by operator type")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(f"{args.model}, input {args.batch}×3×{args.size}×{args.size}, fp32, CPU: {cpu_name()}, "
          f"{os.cpu_count()} cores, {threads} threads (torch and onnxruntime); torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; {args.clock} clock, median of {args.repeats} runs after "
          f"{args.warmup}; {load()} at the start\n")
    rows, fns = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for attn in [None, *[a for a in args.attn.split(",") if a]]:
            model = attnkit.create_model(args.model, attn=attn).eval()
            fused = attnkit.fuse(model)
            path = f"{tmp}/{attn or BASELINE}.onnx"
            report = attnkit.export(model, path, "onnx", input_shape=(3, args.size, args.size), batch_size=args.batch)
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {"image": x.numpy()}
            params, fused_params = (sum(p.numel() for p in m.parameters()) for m in (model, fused))
            rows.append((attn or BASELINE, params, fused_params, report.max_rel_error))
            fns += [lambda model=model: model(x), lambda fused=fused: fused(x),
                    lambda session=session, feed=feed: session.run(None, feed)]
        with torch.inference_mode():
            times = median_ms(fns, args.warmup, args.repeats, CLOCKS[args.clock])
        profiles = {name: ort_profile(f"{tmp}/{name}.onnx", threads, x, args.repeats) for name, *_ in rows
                    } if args.ort_profile else {}
    plain = times[:3]
    print("| variant | params | eager ms | fused ms | fused params | onnxruntime ms | over plain: eager, fused, "
          "onnxruntime | ORT check (max rel err) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for i, (name, params, fused_params, error) in enumerate(rows):
        eager, folded, ort = times[3 * i: 3 * i + 3]
        over = ", ".join(f"{100 * (t / p - 1):+.1f}%" for t, p in zip((eager, folded, ort), plain))
        print(f"| {name} | {params:,} | {eager:.1f} | {folded:.1f} | {fused_params:,} | {ort:.1f} | {over} | "
              f"{error:.1e} |", flush=True)
    if profiles:
        print(f"\nonnxruntime kernel time per run by operator type, ms (mean of {args.repeats} profiled runs):\n")
        for name, per_op in profiles.items():
            ops = ", ".join(f"{op} {ms:.2f}" for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1]) if ms >= 0.01)
            print(f"- {name}: total {sum(per_op.values()):.1f}; {ops}")


def ort_profile(path: str, threads: int, x: torch.Tensor, runs: int) -> dict[str, float]:
    """onnxruntime's kernel time per run of the model at `path`, in ms, by operator type: the mean over `runs` runs
    after a first one (which allocates)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.splitext(path)[0] + "-profile"
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, {"image": x.numpy()})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event["ts"] > first["ts"] + first["dur"]):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return dict(per_op)

if __name__ == "__main__":
    main()
