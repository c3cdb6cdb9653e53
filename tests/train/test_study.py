"""Study files: `attnkit compare --config study.toml`, the command line over the file, mistakes named with the file
and the key, and the resolved configuration written back as study.toml and into the report."""
from __future__ import annotations

import json

import pytest

from attnkit import cli
from attnkit.train.study import read_study, study_toml

STUDY = """
attn = ["se", "cbam(reduction=8, kernel_size=3)"]
where = ["auto", "position=output"]
seeds = 5
launcher = "submitit"

[train]
model = "resnet56"
dataset = "cifar100"
epochs = 160
lr = 1
milestones = [80, 120]
amp = "bf16"
channels-last = true

[slurm]
partition = "gpu"
time = "12:00:00"
gpus_per_run = 2
mem_gb = 32
sbatch = { qos = "high", exclusive = true }
setup = ["module load cuda"]
"""


def write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def parse(study, *argv):
    return cli._parser(read_study(study)).parse_args(["compare", "--config", str(study), *argv])


def test_a_study_file_sets_the_options_and_the_command_line_overrides_them(tmp_path):
    study = write(tmp_path, STUDY)
    args = parse(study)
    assert cli.split_specs(args.attn) == ["se", "cbam(reduction=8, kernel_size=3)"]
    assert args.where == ["auto", "position=output"] and args.seeds == [0, 1, 2, 3, 4]
    assert (args.model, args.dataset, args.epochs, args.amp) == ("resnet56", "cifar100", 160, "bf16")
    assert args.milestones == [80, 120]
    assert args.lr == 1.0 and isinstance(args.lr, float) and args.channels_last is True
    assert (args.launcher, args.partition, args.time, args.gpus_per_run, args.mem_gb) == ("submitit", "gpu", 720, 2, 32)
    assert args.sbatch == [("qos", "high"), ("exclusive", True)] and args.setup == ["module load cuda"]
    assert args.batch_size == 64 and args.cluster == "slurm"  # what the file leaves out keeps compare's defaults

    args = parse(study, "--seeds", "0,7", "--where", "stages=3", "--epochs", "7", "--time", "1-00:00:00",
                 "--sbatch", "constraint=a100", "--no-channels-last")
    assert args.seeds == [0, 7] and args.where == ["stages=3"]  # a list on the command line replaces the file's
    assert (args.epochs, args.time, args.channels_last, args.model) == (7, 1440, False, "resnet56")
    assert args.sbatch == [("constraint", "a100")]


def test_the_resolved_study_reads_back_to_the_same_options(tmp_path):
    args = parse(write(tmp_path, STUDY), "--epochs", "7")
    resolved = cli._resolved_study(args)
    again = parse(write(tmp_path, study_toml(resolved), "resolved.toml"))
    assert cli._resolved_study(again) == resolved
    assert resolved["train"]["epochs"] == 7 and resolved["slurm"]["sbatch"] == {"qos": "high", "exclusive": True}
    assert "image_size" not in study_toml(resolved)  # None: the default, which TOML cannot write


@pytest.mark.parametrize("text, message", [
    ("epochs = 3", r"study.toml: epochs is not a study option here \(it belongs in \[train\]\)"),
    ("[train]\nattn = 'se'", r"\[train\] attn is not a study option here \(it belongs at the top of the file\)"),
    ("[train]\nseed = 1", r"\[train\] seed is not a study option here \(compare sets it for each run\)"),
    ("[train]\nepocs = 1", r"\[train\] epocs is not a study option here \(known here: .*epochs"),
    ("[train]\nepochs = 'ten'", r"\[train\] epochs must be an integer, got 'ten'"),
    ("[train]\noptimizer = 'adam'", r"\[train\] optimizer must be one of sgd, adamw, got 'adam'"),
    ("[train]\nclip_grad = true", r"\[train\] clip_grad must be a number, got True"),
    ("seeds = [0, '1']", r"seeds must be a count \(5\) or a list of seeds"),
    ("launcher = 'ssh'", r"launcher must be one of local, submitit"),
    ("[slurm]\ntime = 'soon'", r"\[slurm\] time must be minutes \(90\) or Slurm's"),
    ("[slurm]\nsbatch = 'qos=high'", r"\[slurm\] sbatch must be a table of sbatch options"),
    ("[cluster]\nname = 'x'", r"cluster is not a study option here \(it belongs in \[slurm\]\)"),
    ("attn = [", r"study.toml is not valid TOML"),
])
def test_mistakes_in_a_study_are_named_with_the_file_and_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_study(write(tmp_path, text))


def test_the_command_names_a_bad_study_in_one_line(tmp_path, capsys):
    assert cli.main(["compare", "--config", str(tmp_path / "missing.toml")]) == 2
    missing = tmp_path / "missing.toml"
    assert capsys.readouterr().err.strip() == f"attnkit compare: error: --config {missing}: no such file."
    assert cli.main(["compare", "--config", str(write(tmp_path, "[train]\nepochs = 0.5"))]) == 2
    assert "[train] epochs must be an integer, got 0.5" in capsys.readouterr().err


def test_the_report_records_the_resolved_configuration(tmp_path, capsys):
    study = write(tmp_path, 'attn = "se"\nseeds = 1\nlauncher = "submitit"\n[train]\nmodel = "lenet"\n'
                            'dataset = "digits"\nimage_size = 28\nepochs = 3\nthreads = 1\ntensorboard = false\n'
                            '[slurm]\ncluster = "debug"\n')
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--config", str(study), "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    assert "2 runs (0 found finished in the folder)" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["study"]["train"]["epochs"] == 1 and saved["study"]["slurm"]["cluster"] == "debug"
    assert saved["command"].startswith("attnkit compare --config")
    assert read_study(out / "study.toml")["epochs"] == 1
    report = (out / "report.md").read_text()
    assert "```toml\nattn = [\"se\"]" in report and "epochs = 1\n" in report and 'cluster = "debug"' in report


def test_options_of_the_other_launcher_are_refused(tmp_path, capsys):
    assert cli.main(["compare", "--launcher", "submitit", "--jobs", "2"]) == 2
    assert "--jobs is for --launcher local" in capsys.readouterr().err
    assert cli.main(["compare", "--partition", "gpu"]) == 2  # would train on the machine it was typed on
    assert "--partition is an option of --launcher submitit: add --launcher submitit" in capsys.readouterr().err
    assert cli.main(["compare", "--config", str(write(tmp_path, "[slurm]\ntime = 60"))]) == 2
    assert "--time is an option of --launcher submitit" in capsys.readouterr().err
