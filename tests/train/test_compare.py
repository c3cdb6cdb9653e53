"""compare() and `attnkit compare` end to end with tiny settings: the files, real plots, paired statistics over the
runs' own numbers, resuming without repeating finished runs, and placements compared like modules."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from attnkit import cli
from attnkit.analysis.stats import paired_comparison
from attnkit.train import compare
from attnkit.compare import DEFAULT_STUDY


def assert_real_png(path, min_size=(300, 200)):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 5, f"{path} looks blank"


def test_compare_writes_the_report_and_resumes(tiny, tmp_path):
    out = tmp_path / "cmp"
    result = compare(tiny(epochs=1), modules=["se", "eca"], seeds=[0, 1, 2], out_dir=out, progress=False)
    assert result.trained == 9
    assert [r["variant"] for r in result.rows] == ["plain", "se", "eca"]
    for name in ("results.csv", "runs.csv", "results.json", "report.md"):
        assert (out / name).is_file()
    for name in ("accuracy.png", "curves.png", "acc_vs_params.png"):
        assert_real_png(out / name)

    runs = {(r["variant"], int(r["seed"])): r for r in csv.DictReader(open(out / "runs.csv"))}
    assert len(runs) == 9
    se = paired_comparison([float(runs["se", s]["test_acc"]) for s in range(3)],
                           [float(runs["plain", s]["test_acc"]) for s in range(3)])
    row = next(r for r in csv.DictReader(open(out / "results.csv")) if r["variant"] == "se")
    assert float(row["diff"]) == pytest.approx(se.mean_diff) and float(row["p_value"]) == pytest.approx(se.p_value)
    assert int(row["params"]) > int(next(csv.DictReader(open(out / "results.csv")))["params"])
    report = (out / "report.md").read_text()
    assert "| plain |" in report and "| se |" in report and "Holm" in report
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 9 and saved["summary"][1]["verdict"] in ("better", "worse", "no detectable difference")
    for row in saved["summary"]:  # the guardrails, per variant
        assert isinstance(row["converged"], bool) and "final_rise_pp" in row and "train_test_gap_pp" in row
    assert saved["summary"][0]["converged"] is False  # one epoch: nothing shows that it stopped rising
    assert all(row["min_detectable_effect_pp"] > 0 for row in saved["summary"][1:])
    assert saved["environments"] == [saved["runs"][0]["environment"]] and saved["environments"][0]["threads"] == 1
    assert "## Can the comparison be trusted?" in report and "NOT CONVERGED" in report and "## Reproducibility" in report

    again = compare(tiny(epochs=1), modules=["se", "eca"], seeds=[0, 1, 2], out_dir=out, progress=False)
    assert again.trained == 0 and again.rows == result.rows
    (out / "eca" / "seed1" / "result.json").unlink()
    (out / "eca" / "seed1" / "last.pt").unlink()
    more = compare(tiny(epochs=1), modules=["se", "eca"], seeds=[0, 1, 2, 3], out_dir=out, progress=False)
    assert more.trained == 4  # the deleted run and seed 3's three runs
    with pytest.raises(ValueError, match="holds a finished run with other options \\(epochs: 1 there, 2 now\\)"):
        compare(tiny(epochs=2), modules=["se"], seeds=[0], out_dir=out, progress=False)


def test_placements_are_compared_like_modules(tiny, tmp_path):
    result = compare(tiny(model="resnet20", image_size=16, epochs=1), modules=["se"], seeds=[0, 1],
                     placements=["auto", "position=output", "stages=3"], out_dir=tmp_path / "where", progress=False)
    assert [r["variant"] for r in result.rows] == ["plain", "se", "se@position=output", "se@stages=3"]
    params = {r["variant"]: r["params"] for r in result.rows}
    assert params["se"] == params["se@position=output"] > params["se@stages=3"] > params["plain"]
    assert (tmp_path / "where" / "se@stages=3" / "seed1" / "result.json").is_file()


def test_compare_in_parallel_processes_gives_the_same_accuracies(tiny, tmp_path):
    """Unless --threads says otherwise, every run has one thread whatever --jobs is: the numbers do not depend on it."""
    serial = compare(tiny(epochs=1, threads=None), modules=["eca"], seeds=[0, 1], out_dir=tmp_path / "serial",
                     progress=False)
    parallel = compare(tiny(epochs=1, threads=None), modules=["eca"], seeds=[0, 1], out_dir=tmp_path / "parallel",
                       jobs=2, progress=False)
    assert [r["test_acc"] for r in serial.runs] == [r["test_acc"] for r in parallel.runs]
    assert {r["environment"]["threads"] for r in serial.runs + parallel.runs} == {1}


def test_cli_compare_prints_the_table(tmp_path, capsys):
    code = cli.main(["compare", "--model", "lenet", "--dataset", "digits", "--image-size", "28", "--attn", "se,cbam(reduction=2, kernel_size=3)",
                     "--seeds", "2", "--epochs", "1", "--out", str(tmp_path / "c"), "--jobs", "1", "--no-progress",
                     "--no-tensorboard"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["variant", "accuracy"]
    assert [line.split()[0] for line in lines[1:4]] == ["plain", "se", "cbam(reduction=2,"]
    assert "6 runs (0 found finished in the folder)" in out
    assert "rise, last fifth (pp)  converged" in out and "NOT CONVERGED: plain" in out  # one epoch shows no plateau
    command = json.loads((tmp_path / "c" / "results.json").read_text())["command"]
    assert command.startswith("attnkit compare --model lenet")


def test_split_specs_keeps_commas_inside_parentheses():
    assert cli.split_specs("se, cbam(reduction=8, kernel_size=3),eca,plain") == ["se", "cbam(reduction=8, kernel_size=3)", "eca"]


def test_cli_compare_defaults_to_the_default_study():
    args = cli._parser().parse_args(["compare"])
    assert args.dataset == DEFAULT_STUDY["dataset"] == "cluttered-digits" and args.seeds == [0, 1, 2]
    assert args.epochs == DEFAULT_STUDY["epochs"] and args.threads is None and args.init == "paper"
    assert cli.split_specs(args.attn) == ["se", "cbam", "eca", "srm", "coord"]
    assert cli._parser().parse_args(["train"]).dataset == "digits"


def test_a_second_comparison_on_the_same_folder_refuses(tiny, tmp_path):
    """Two comparisons writing one folder's summary would interleave it: the second says who holds the folder."""
    from attnkit.train.runlock import RunFolderBusy, RunFolderLock

    out = tmp_path / "cmp"
    with RunFolderLock(out, owner="attnkit compare", option="--out"):
        with pytest.raises(RunFolderBusy, match=r"in use by another attnkit compare \(pid \d+\).*another --out"):
            compare(tiny(epochs=1), modules=["se"], seeds=[0], out_dir=out, progress=False)
    assert not (out / "results.csv").exists()
    result = compare(tiny(epochs=1), modules=["se"], seeds=[0], out_dir=out, progress=False)
    assert result.trained == 2 and (out / "results.csv").is_file()
    assert not list(out.glob(".*.tmp")), "a summary file was not written through a temporary file"
