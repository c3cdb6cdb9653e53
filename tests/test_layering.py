"""The package reads one way down: every attnkit module imports only its own group or the layers below it."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import attnkit

ROOT = Path(attnkit.__file__).parent

# Top to bottom. A layer holds one or more groups; a group may import itself and any group of a lower layer,
# never a higher layer nor another group of its own layer (training and analysis stand side by side).
LAYERS: list[tuple[str, list[tuple[str, ...]]]] = [
    ("command line and the package's facade", [("attnkit", "attnkit.cli", "attnkit.__main__")]),
    ("comparison", [("attnkit.compare",)]),
    ("training / analysis / deployment / integrations",
     [("attnkit.train",), ("attnkit.analysis",), ("attnkit.deploy",), ("attnkit.integrations",)]),
    ("runs (options, checkpoints, networks rebuilt from them)", [("attnkit.runs",)]),
    ("models / surgery / data", [("attnkit.models", "attnkit.surgery", "attnkit.data", "attnkit.capture", "attnkit.cost")]),
    ("modules", [("attnkit.modules",)]),
    ("kernels", [("attnkit.kernels",)]),
    # The registry stores names only: the modules, models and data sets register themselves into it.
    ("registry and files", [("attnkit.registry", "attnkit.files", "attnkit.hooks", "attnkit._paths", "attnkit._version")]),
]

# Imports against the order that the public API needs, with the reason.
ALLOWED = {
    ("attnkit.train", "attnkit.compare"): "attnkit.train.compare (README) is re-exported lazily, on first use",
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = ("attnkit",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, attnkit module) of every import in `source`, the module `name`, at any depth (function bodies too)."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "attnkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "attnkit":
                continue
            for alias in node.names:  # `from .. import compare` imports the module attnkit.compare
                submodule = f"{target}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known else target))
    return list(dict.fromkeys(found))


def place(module: str) -> tuple[int, int] | None:
    """(layer, group) of `module`: the group with the longest prefix of its name."""
    best, length = None, -1
    for layer, (_, groups) in enumerate(LAYERS):
        for group, prefixes in enumerate(groups):
            for prefix in prefixes:
                inside = "." in prefix and module.startswith(prefix + ".")  # "attnkit" is the facade alone
                if (module == prefix or inside) and len(prefix) > length:
                    best, length = (layer, group), len(prefix)
    return best


def _group_name(where: tuple[int, int]) -> str:
    return "/".join(LAYERS[where[0]][1][where[1]])


def violations(sources: dict[str, tuple[str, str, bool]]) -> list[str]:
    """What breaks the order in `sources`: module name -> (file, source, is a package)."""
    known = set(sources)
    problems = []
    for name, (file, source, is_package) in sorted(sources.items()):
        mine = place(name)
        if mine is None:
            problems.append(f"{file}: module {name} is in no layer; add it to LAYERS in tests/test_layering.py")
            continue
        for line, target in imported_modules(source, name, is_package, known):
            theirs = place(target)
            if theirs is None or theirs == mine or theirs[0] > mine[0]:
                continue
            if any(name == a and (target == b or target.startswith(b + ".")) for a, b in ALLOWED):
                continue
            relation = "a higher layer" if theirs[0] < mine[0] else "another group of its layer"
            problems.append(f"{file}:{line}: {name} ({_group_name(mine)}) imports {target} ({_group_name(theirs)}), "
                            f"{relation}")
    return problems


@functools.cache
def _package_sources() -> dict[str, tuple[str, str, bool]]:
    return {module_name(path): (str(path.relative_to(ROOT.parent)), path.read_text(), path.name == "__init__.py")
            for path in sorted(ROOT.rglob("*.py"))}


def test_no_module_imports_a_layer_above_its_own():
    order = "\n".join(f"  {i}. {title}: {' | '.join('/'.join(g) for g in groups)}" for i, (title, groups) in enumerate(LAYERS))
    problems = violations(_package_sources())
    assert not problems, "imports against the layer order (top to bottom):\n" + order + "\n" + "\n".join(problems)


def test_every_allowed_exception_is_still_used():
    sources = _package_sources()
    known = set(sources)
    used = {(a, b) for name, (_, source, is_package) in sources.items()
            for _, target in imported_modules(source, name, is_package, known)
            for a, b in ALLOWED if name == a and (target == b or target.startswith(b + "."))}
    assert used == set(ALLOWED), f"ALLOWED lists imports the package no longer makes: {set(ALLOWED) - used}"


def test_the_check_names_the_file_and_the_import_that_goes_up():
    sources = {
        "attnkit.runs.load": ("attnkit/runs/load.py", "import os\nfrom ..train.trainer import train\n", False),
        "attnkit.train.trainer": ("attnkit/train/trainer.py", "from ..analysis import stats\n", False),
        "attnkit.analysis.stats": ("attnkit/analysis/stats.py", "from .. import runs\n", False),
        "attnkit.runs": ("attnkit/runs/__init__.py", "from .load import load_run\n", True),
        "attnkit.analysis": ("attnkit/analysis/__init__.py", "", True),
    }
    assert violations(sources) == [
        "attnkit/runs/load.py:2: attnkit.runs.load (attnkit.runs) imports attnkit.train.trainer (attnkit.train), "
        "a higher layer",
        "attnkit/train/trainer.py:1: attnkit.train.trainer (attnkit.train) imports attnkit.analysis.stats "
        "(attnkit.analysis), another group of its layer",
    ]


def test_library_code_draws_with_the_object_api_and_leaves_benchmarks_alone():
    """Figures come from attnkit.analysis.plotting (Figure on an Agg canvas): no pyplot, no matplotlib.use() that
    would change the caller's backend; and nothing in the package imports the benchmark scripts."""
    problems = []
    for name, (file, source, _) in _package_sources().items():
        for node in ast.walk(ast.parse(source)):
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            problems += [f"{file}:{node.lineno}: imports {m}" for m in imported
                         if m == "matplotlib.pyplot" or m.split(".")[0] in ("benchmarks", "timing")]
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "matplotlib"):
                problems.append(f"{file}:{node.lineno}: calls matplotlib.use()")
    assert not problems, "\n".join(problems)
