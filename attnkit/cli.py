"""The `attnkit` command; each subcommand is a thin layer over the library."""
from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch

from . import registry


def smoke(channels: int = 32, size: tuple[int, int] = (9, 7), batch: int = 4) -> list[dict[str, object]]:
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
        rows.append(
            {
                "module": name,
                "class": type(module).__name__,
                "params": sum(p.numel() for p in module.parameters()),
                "output": "×".join(map(str, y.shape)),
                "finite": finite,
                "ms": 1e3 * elapsed,
            }
        )
    return rows


def _print_table(rows: list[dict[str, object]]) -> None:
    headers = list(rows[0])
    cells = [[f"{r[h]:.1f}" if isinstance(r[h], float) else str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered attention modules")
    p_smoke = sub.add_parser("smoke", help="build every module and run it forward and backward")
    p_smoke.add_argument("--channels", type=int, default=32)
    args = parser.parse_args(argv)

    if args.command == "list":
        print("\n".join(registry.list_modules()))
        return 0
    rows = smoke(args.channels)
    _print_table(rows)
    failed = [r["module"] for r in rows if not r["finite"]]
    if failed:
        print(f"non-finite output or gradient: {', '.join(failed)}")
        return 1
    print(f"{len(rows)} modules built and ran forward and backward.")
    return 0
