"""Inference latency of a backbone with each attention module, as deployed: PyTorch eager, PyTorch after
attnkit.fuse (BatchNorms folded), and onnxruntime on the file attnkit.export writes, in one run.

    python benchmarks/deploy_latency.py [--model resnet50 --size 224 --batch 1 --repeats 20]

Each variant's three runtimes take turns, run by run, and the median is reported; the ONNX column also gives
the export check's largest relative error against the unfolded PyTorch model. CPU only.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile

import onnxruntime
import torch

import attnkit
from timing import median_ms  # benchmarks/timing.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--attn", default=",".join(attnkit.list_modules()), help="comma-separated module names")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(f"{args.model}, input {args.batch}×3×{args.size}×{args.size}, fp32, CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {threads} threads (torch and onnxruntime); torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; median of {args.repeats} runs after {args.warmup}\n")
    print("| variant | params | eager ms | fused ms | fused params | onnxruntime ms | ORT check (max rel err) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for attn in [None, *[a for a in args.attn.split(",") if a]]:
            model = attnkit.create_model(args.model, attn=attn).eval()
            fused = attnkit.fuse(model)
            path = f"{tmp}/{attn or 'plain'}.onnx"
            report = attnkit.export(model, path, "onnx", input_shape=(3, args.size, args.size), batch_size=args.batch)
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {"image": x.numpy()}
            with torch.inference_mode():
                eager, folded, ort = median_ms(
                    [lambda: model(x), lambda: fused(x), lambda: session.run(None, feed)], args.warmup, args.repeats
                )
            params = sum(p.numel() for p in model.parameters())
            fused_params = sum(p.numel() for p in fused.parameters())
            print(f"| {attn or 'plain'} | {params:,} | {eager:.1f} | {folded:.1f} | {fused_params:,} | {ort:.1f} | "
                  f"{report.max_rel_error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
