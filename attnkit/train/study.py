"""Study files: a comparison written as TOML, run with `attnkit compare --config study.toml` (options on the
command line override the file's), and written back, resolved, as study.toml next to the comparison's report.

    attn = ["se", "cbam(reduction=8)", "eca"]   # compare's own options at the top
    seeds = 5
    out = "runs/cifar100"
    launcher = "submitit"

    [train]                                      # every `attnkit train` option
    model = "resnet56"
    dataset = "cifar100"
    epochs = 160

    [slurm]                                      # where each run's job runs (--launcher submitit)
    partition = "gpu"
    time = "12:00:00"
    sbatch = { qos = "high" }

Keys are the command line's option names, with - or _.
"""
from __future__ import annotations

import json
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from ..runs.config import CHOICES, TrainConfig
from .slurm import CLUSTERS, parse_time

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

__all__ = ["COMPARE_OWN", "read_study", "study_toml"]

COMPARE_OWN = {"attn", "where", "seed", "run_dir", "resume", "progress"}  # set per run by compare, not in [train]
LAUNCHERS = ("local", "submitit")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(expected: str, accept: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v) -> Any:
    def check(value: Any) -> Any:
        if not accept(value):
            raise TypeError(expected)
        return convert(value)

    return check


def _strings(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _text_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _choice(choices: tuple[str, ...]) -> Any:
    return _expect(f"one of {', '.join(choices)}", lambda v: v in choices)


def _time(value: Any) -> int:
    try:
        return parse_time(value)
    except ValueError:
        raise TypeError("minutes (90) or Slurm's [D-]HH:MM:SS as a string (\"1-12:00:00\")") from None


_POSITIVE = _expect("a positive integer", lambda v: _is_int(v) and v >= 1)
_TEXT = _expect("a string", lambda v: isinstance(v, str))
TOP = {
    "attn": _expect("a spec or a list of specs", _text_list, lambda v: ",".join(_strings(v))),
    "where": _expect("a placement or a list of placements", _text_list, _strings),
    "seeds": _expect("a count (5) or a list of seeds ([0, 3, 7])",
                     lambda v: _is_int(v) and v >= 1 or isinstance(v, list) and v and all(map(_is_int, v)),
                     lambda v: list(range(v)) if _is_int(v) else v),
    "out": _TEXT,
    "jobs": _POSITIVE,
    "launcher": _choice(LAUNCHERS),
}
SLURM = {
    "cluster": _choice(CLUSTERS),
    "partition": _TEXT,
    "account": _TEXT,
    "gpus_per_run": _expect("an integer ≥ 0", lambda v: _is_int(v) and v >= 0),
    "cpus_per_run": _POSITIVE,
    "mem_gb": _expect("a positive number", lambda v: (_is_int(v) or isinstance(v, float)) and v > 0),
    "time": _time,
    "array_parallelism": _POSITIVE,
    "sbatch": _expect("a table of sbatch options, e.g. { qos = \"high\" }",
                      lambda v: isinstance(v, dict) and all(isinstance(x, (str, int, float, bool)) for x in v.values()),
                      lambda v: list(v.items())),
    "setup": _expect("a list of shell lines", _text_list, _strings),
}


def _train_checks() -> dict[str, Callable[[Any], Any]]:
    hints = typing.get_type_hints(TrainConfig)
    checks = {}
    for f in fields(TrainConfig):
        if f.name in COMPARE_OWN:
            continue
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: the option may be left out
            hint = next(t for t in typing.get_args(hint) if t is not type(None))
        if f.name in CHOICES:
            checks[f.name] = _choice(CHOICES[f.name])
        elif typing.get_origin(hint) is tuple:
            checks[f.name] = _expect("a list of integers", lambda v: isinstance(v, list) and all(map(_is_int, v)))
        elif hint is bool:
            checks[f.name] = _expect("true or false", lambda v: isinstance(v, bool))
        elif hint is int:
            checks[f.name] = _expect("an integer", _is_int)
        elif hint is float:
            checks[f.name] = _expect("a number", lambda v: _is_int(v) or isinstance(v, float), float)
        else:
            checks[f.name] = _TEXT
    return checks


def read_study(path: str | Path) -> dict[str, Any]:
    """The options of a study file as `attnkit compare` parses them (its argparse names and values), checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"--config {path} is not valid TOML: {error}.") from None
    sections = {"": TOP, "train": _train_checks(), "slurm": SLURM}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("train", "slurm") and isinstance(value, dict):
            for inner, item in value.items():
                values.update(_checked(path, sections, key, inner, item))
        else:
            values.update(_checked(path, sections, "", key, value))
    return values


def _checked(path: Path, sections: dict[str, dict[str, Callable[[Any], Any]]], section: str, raw_key: str,
             value: Any) -> dict[str, Any]:
    key = raw_key.replace("-", "_")
    where = f"[{section}] " if section else ""
    check = sections[section].get(key)
    if check is None:
        home = next((s for s, known in sections.items() if key in known), None)
        hint = ("it belongs at the top of the file" if home == "" else f"it belongs in [{home}]" if home
                else "compare sets it for each run" if key in COMPARE_OWN
                else f"known here: {', '.join(sorted(sections[section]))}")
        raise ValueError(f"{path}: {where}{raw_key} is not a study option here ({hint}).")
    try:
        return {key: check(value)}
    except TypeError as expected:
        raise ValueError(f"{path}: {where}{raw_key} must be {expected}, got {value!r}.") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def study_toml(study: dict[str, Any]) -> str:
    """A study (compare's options at the top, then the tables "train" and "slurm") as TOML; None values are left
    out, as they are the defaults."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in study.items() if v is not None and k not in ("train", "slurm")]
    for table in ("train", "slurm"):
        if study.get(table):
            lines += ["", f"[{table}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in study[table].items() if v is not None]
    return "\n".join(lines) + "\n"
