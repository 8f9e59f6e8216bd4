"""A run's plumbing, common/launch.py, loop.py and folder.py: the one-line error, run folders, atomic checkpoints,
the schedules."""
import argparse
import json
import re

import pytest
import torch

from common.folder import RUN_MARKER, open_run_folder, save_checkpoint
from common.launch import UserError, exit_on_user_error, require_positive
from common.loop import cosine_schedule, evaluates_test, step_schedule
from conftest import FakeFabric


class FolderFabric(FakeFabric):
    is_global_zero = True
    strategy = argparse.Namespace(precision=argparse.Namespace(precision="32-true"))  # no loss scale

    def barrier(self):
        pass


def test_user_error_is_one_line_and_status_2(capsys):
    def main(args):
        # a UserError raised in a DataLoader worker arrives with the worker's traceback before it
        raise UserError("Caught UserError in DataLoader worker process 0.\nTraceback ...\n"
                        "common.launch.UserError: cannot read image x.jpg")

    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(main, None)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: cannot read image x.jpg\n"


def test_run_folder_rules(tmp_path):
    fabric = FolderFabric()
    folder = lambda out=tmp_path / "run", **flags: open_run_folder(fabric, run_args(out, **flags), "dml")
    out = folder()
    assert out.is_dir()
    (out / "last.ckpt").write_bytes(b"x")
    with pytest.raises(UserError, match="exists and is not empty"):
        folder(out)
    with pytest.raises(UserError, match="exclude each other"):
        folder(out, resume=True, overwrite=True)
    with pytest.raises(UserError, match="no .*args.json to resume from"):
        open_run_folder(fabric, run_args(out, resume=True), "dml", marker="args.json")
    assert folder(out, resume=True) == out and (out / "last.ckpt").exists()
    folder(out, overwrite=True)
    assert out.is_dir() and [path.name for path in out.iterdir()] == [RUN_MARKER]


def run_args(out, resume=False, overwrite=False, **flags):
    return argparse.Namespace(out=out, resume=resume, overwrite=overwrite, **flags)


def test_overwrite_replaces_only_a_run_folder_of_ours(tmp_path, monkeypatch):
    thesis = tmp_path / "thesis"
    (thesis / "mydata").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match=f"not a run folder of this project .*{RUN_MARKER}.*nothing was deleted"):
        open_run_folder(FolderFabric(), run_args(thesis, overwrite=True), "dml")
    assert (thesis / "thesis.tex").read_text() == "years of work" and (thesis / "mydata").is_dir()

    project = tmp_path / "home" / "project"
    (project / ".git").mkdir(parents=True)
    (project / RUN_MARKER).write_text("{}")  # even a marker does not make these deletable
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for out in (".", project, "..", tmp_path / "home", tmp_path):
        with pytest.raises(UserError, match="the working directory, a folder above it or the home folder"):
            open_run_folder(FolderFabric(), run_args(out, overwrite=True), "dml")
    assert (project / ".git").is_dir()

    run = open_run_folder(FolderFabric(), run_args(tmp_path / "run"), "dml")
    assert json.loads((run / RUN_MARKER).read_text()) == {"script": "dml"}
    (run / "last.ckpt").write_bytes(b"x")
    open_run_folder(FolderFabric(), run_args(run, overwrite=True), "dml")
    assert sorted(path.name for path in run.iterdir()) == [RUN_MARKER]  # replaced, and marked again


def test_out_that_is_or_lies_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(UserError, match="is a file, not a folder"):
            open_run_folder(FolderFabric(), run_args(out), "dml")
    with pytest.raises(UserError, match="/proc/kdrun: cannot make this folder"):
        open_run_folder(FolderFabric(), run_args("/proc/kdrun"), "dml")
    with pytest.raises(UserError, match="/proc/kdrun: cannot make this folder"):
        open_run_folder(FolderFabric(), run_args("/proc/kdrun", eval="last.ckpt"), "dml")


def test_a_link_or_a_folder_not_ours_is_never_replaced(tmp_path):
    run = open_run_folder(FolderFabric(), run_args(tmp_path / "run"), "dml")
    (run / "last.ckpt").write_bytes(b"x")
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(UserError, match="link.* is a link to .*run; nothing was deleted"):
        open_run_folder(FolderFabric(), run_args(tmp_path / "link", overwrite=True), "dml")
    assert (run / "last.ckpt").is_file() and (tmp_path / "link").is_symlink()
    (run / RUN_MARKER).unlink()
    with pytest.raises(UserError, match="is not a run folder of this project .*: give another --out$"):
        open_run_folder(FolderFabric(), run_args(run), "dml")


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_afresh(tmp_path):
    out = tmp_path / "run"
    open_run_folder(FolderFabric(), run_args(out), "dml")
    (out / "args.json").write_text(json.dumps({"out": str(out), "epochs": 5, "img_size": 32, "resume": False}))
    with pytest.raises(UserError, match="cannot resume .*made with --epochs 5 \\(now 6\\)"):  # not the same run
        open_run_folder(FolderFabric(), run_args(out, resume=True, epochs=6), "dml")
    args = run_args(out, resume=True, epochs=5, img_size=None)  # None: filled in by the run, as --img-size
    assert open_run_folder(FolderFabric(), args, "dml") == out and args.resume is False


def test_eval_never_replaces_nor_continues_a_run(tmp_path):
    run = open_run_folder(FolderFabric(), run_args(tmp_path / "run"), "dml")
    (run / "results.json").write_text("{}")
    for flag in ("overwrite", "resume"):
        with pytest.raises(UserError, match=f"--eval writes eval.json .*leave out --{flag}"):
            open_run_folder(FolderFabric(), run_args(run, eval="last.ckpt", **{flag: True}), "dml")
    assert open_run_folder(FolderFabric(), run_args(run, eval="last.ckpt"), "dml") == run  # eval.json beside
    assert sorted(path.name for path in run.iterdir()) == [RUN_MARKER, "results.json"]
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    open_run_folder(FolderFabric(), run_args(thesis, eval="last.ckpt"), "dml")
    assert [path.name for path in thesis.iterdir()] == ["thesis.tex"]  # not marked: --overwrite stays refused


@pytest.mark.parametrize("marker", ["args.json", "last.ckpt"])  # takd and ktg_ensemble; dml and deit
def test_a_refused_resume_writes_nothing(tmp_path, marker):
    out = open_run_folder(FolderFabric(), run_args(tmp_path / "run"), "takd")
    made = {"chain": ["plain4", "plain2"], "epochs": 2}
    (out / "args.json").write_text(json.dumps(made))
    for changed in ({"epochs": 3}, {"chain": ["plain6", "plain2"]}):
        with pytest.raises(UserError, match=f"cannot resume .*made with --{next(iter(changed))} "):
            open_run_folder(FolderFabric(), run_args(out, resume=True, **{**made, **changed}), "takd", marker)
    assert json.loads((out / "args.json").read_text()) == made
    assert open_run_folder(FolderFabric(), run_args(out, resume=True, **made), "takd", marker) == out


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    fabric = FolderFabric()
    fabric.save = lambda path, state: torch.save({"epoch": state["epoch"]}, path)
    save_checkpoint(fabric, tmp_path / "last.ckpt", {"model": model, "epoch": 1})
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN or infinite by epoch 2: stopped; the last good checkpoint is"):
        save_checkpoint(fabric, tmp_path / "last.ckpt", {"model": model, "epoch": 2})
    assert torch.load(tmp_path / "last.ckpt")["epoch"] == 1
    with pytest.raises(UserError, match="no checkpoint was written"):
        save_checkpoint(fabric, tmp_path / "best.ckpt", {"model": model, "epoch": 2})
    assert not (tmp_path / "best.ckpt").exists()


def test_eval_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    from lightning_fabric import Fabric

    from common.folder import load_for_eval

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    torch.save({"model": model.state_dict()}, tmp_path / "nan.ckpt")
    with pytest.raises(UserError, match="nan.ckpt holds NaN or infinite weights: not evaluated"):
        load_for_eval(Fabric(accelerator="cpu", devices=1), tmp_path / "nan.ckpt", {"model": torch.nn.Linear(2, 2)})


def test_ctrl_c_and_sigterm_are_one_line_and_status_130(capsys):
    import os
    import signal

    def main(args):
        os.kill(os.getpid(), signal.SIGTERM)  # a cluster's preemption

    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(main, argparse.Namespace(out="runs/x", resume=False))
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "interrupted: --resume --out runs/x continues from its last checkpoint\n"
    with pytest.raises(SystemExit):
        exit_on_user_error(main, argparse.Namespace(out="runs/x", resume=False, search=2))
    assert capsys.readouterr().err == "interrupted: --resume --out runs/x continues from its finished trials\n"
    with pytest.raises(SystemExit):  # reproduce.py has no --resume: its command again goes on
        exit_on_user_error(main, argparse.Namespace(out="results/dml"))
    assert capsys.readouterr().err == "interrupted: the same command again continues it\n"


def test_require_positive():
    require_positive(lr=0.1, img_size=None)  # None: not given, nothing to check
    with pytest.raises(UserError, match="--batch-size must be positive, got 0"):
        require_positive(batch_size=0)


def test_test_split_every_n_epochs_and_the_last():
    assert [evaluates_test(epoch, 7, 3) for epoch in range(7)] == [False, False, True, False, False, True, True]
    assert all(evaluates_test(epoch, 4, 1) for epoch in range(4))


def test_step_schedule():
    # lr 0.1, ÷10 at epochs 2 and 4, one warm-up epoch of 10 steps
    rates = [step_schedule(0.1, epoch, 9, 10, [2, 4], 1) for epoch in range(5)]
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    assert step_schedule(0.1, 0, 4, 10, [2, 4], 1) == pytest.approx(0.05)


@pytest.mark.parametrize("script", ["dml", "deit", "takd", "ktg_ensemble"])
def test_help_says_each_default_once_and_the_lr_batch(script, capsys):
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    # no flag says its default twice, nor "None"
    assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text)
    lr_help = text.split("--lr LR ")[1].split(" --")[0]
    assert "batch" in lr_help and any(size in lr_help for size in ("512", "128", "64"))


def test_config_starts_from_a_runs_arguments_and_bad_config_is_one_line(tmp_path, capsys):
    import dml

    (tmp_path / "args.json").write_text('{"students": ["resnet8", "resnet14"], "epochs": 7, "out": "elsewhere"}')
    args = dml.parse_args(["--config", str(tmp_path / "args.json"), "--epochs", "9"])
    assert args.students == ["resnet8", "resnet14"] and args.epochs == 9 and args.out is None
    for text, message in [("{not json", "cannot read it as JSON"), ("[1, 2]", "not a JSON object of flags"),
                          ('{"epoch": 3}', "epoch is not a flag of this script"),  # a typo is not ignored
                          ('{"epochs": 1.5}', "bad.json: --epochs: invalid int value 1.5"),
                          ('{"epochs": "abc"}', "bad.json: --epochs: invalid int value 'abc'"),
                          ('{"mode": "bogus"}', "bad.json: --mode: invalid choice 'bogus'"),
                          ('{"students": "vit_micro"}', "bad.json: --students must be a list"),
                          ('{"model_ema": "yes"}', "bad.json: --model-ema must be true or false"),
                          ('{"seed": null}', "bad.json: --seed cannot be null"),  # a traceback before
                          ("{}", "bad.json holds no flags"), ('{"script": "dml"}', "bad.json holds no flags")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(SystemExit) as exit_:
            dml.parse_args(["--config", str(tmp_path / "bad.json")])
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and message in error
        assert error.startswith("error: --config ") and error.count("\n") == 1  # no usage block: the file is wrong
    for path, message in [(tmp_path / "missing.json", "no such file"), (tmp_path, "not a file")]:
        with pytest.raises(SystemExit):
            dml.parse_args(["--config", str(path)])
        assert capsys.readouterr().err == f"error: --config {path}: {message}\n"


@pytest.mark.parametrize("name", ["deit", "takd", "ktg_ensemble"])
def test_a_runs_files_given_to_another_script_are_refused(tmp_path, capsys, name):
    import importlib

    import dml
    script = importlib.import_module(name)
    args = dml.parse_args(["--students", "resnet8", "resnet8"])
    assert args.script == "dml"
    (tmp_path / "args.json").write_text(json.dumps(vars(args)))
    torch.save({"args": vars(args)}, tmp_path / "last.ckpt")
    for flag in ("--config", "--eval"):
        with pytest.raises(SystemExit) as exit_:
            script.parse_args([flag, str(tmp_path / ("args.json" if flag == "--config" else "last.ckpt"))])
        error = capsys.readouterr().err
        assert exit_.value.code == 2 and f"was made by dml.py, not {name}.py: give it to dml.py" in error


class Stop(Exception):
    pass


@pytest.mark.parametrize("name", ["dml", "deit", "takd", "ktg_ensemble"])
def test_split_seed_not_seed_picks_the_subset_and_the_held_out_images(name, tmp_path, monkeypatch):
    """`--seed` varies weights, order and augmentation; the images trained on and
    held out follow `--split-seed` alone, so that seeds of a table share them."""
    import importlib

    import common.data
    from common.data import load_dataset
    script = importlib.import_module(name)
    seeds = []
    monkeypatch.setattr(common.data, "load_dataset",
                        lambda *args: seeds.append(("subset", args[-1])) or load_dataset(*args))

    def held_out(data, fraction, seed):
        seeds.append(("held out", seed))
        raise Stop  # the images are chosen: no need to train
    monkeypatch.setattr(common.data, "hold_out", held_out)
    with pytest.raises(Stop):
        script.main(script.parse_args(["--seed", "3", "--split-seed", "7", "--train-subset", "100", "--val-split",
                                       "0.2", "--epochs", "1", "--out", str(tmp_path / "run")]))
    assert seeds == [("subset", 7), ("held out", 7)]


def test_curves_are_redrawn_now_and_then_and_after_the_last_epoch(tmp_path, monkeypatch):
    import common.folder as folder

    drawn, saved = [], []
    # as the real one: a new file each time, renamed over the last
    monkeypatch.setattr(folder, "save_checkpoint", lambda fabric, path, state: saved.append(path.name)
                        or folder.write_json(path, state["epoch"]))
    monkeypatch.setattr(folder, "plot_curves", lambda path, rows, panels: drawn.append(len(rows)) or path.touch())
    state = {"history": [], "best_top1": -1.0}
    for epoch in range(1, 5):
        state["history"].append({"epoch": epoch, "top1": 10.0})
        state["epoch"] = epoch
        folder.save_epoch(FolderFabric(), tmp_path, state, 10.0, panels=[], last=epoch == 4)
    assert drawn == [1, 4]  # the first epoch, then none within CURVES_EVERY_S, then the last
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 5  # the CSV is written every epoch
    # an improving epoch (only the first: the same top-1 after) is serialised once, best.ckpt is the same file
    assert saved == ["last.ckpt"] * 4 and (tmp_path / "best.ckpt").read_text() == "1\n"


@pytest.mark.parametrize("script, flags", [
    ("dml.py", ["--students", "resnet8", "resnet8", "--grad-accum-steps", "2"]),
    ("deit.py", ["--model", "deit_micro", "--recipe", "deit", "--repeated-aug", "1"]),  # Mixup, erasing, drop-path
], ids=["dml", "deit"])
def test_sigterm_inside_an_epoch_saves_that_step_and_resume_goes_on_exactly(tmp_path, capsys, script, flags):
    import signal
    import subprocess
    import sys

    import deit
    import dml
    from conftest import ROOT, metrics_without_speed, results, run_main

    args = [*flags, "--epochs", "2", "--train-subset", "600", "--batch-size", "20", "--log-every", "4"]
    module = {"dml.py": dml, "deit.py": deit}[script]
    run_main(module, *args, "--out", tmp_path / "whole")
    stopped = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, script, *args, "--out", str(stopped)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in process.stdout:  # without a terminal each read prints a line: stop in the second epoch
        if line.startswith("epoch 2/2 step 8/30"):
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    said = re.search(r"stopped at epoch 2, step (\d+)", out)
    assert said and 4 <= int(said[1]) * (2 if script == "dml.py" else 1) < 30, out  # inside the epoch
    checkpoint = torch.load(stopped / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["mid_epoch"]["steps"] == int(said[1])
    capsys.readouterr()
    run_main(module, "--eval", stopped / "last.ckpt", "--batch-size", "20")
    assert f"was saved by a run stopped at step {said[1]} of epoch 2" in capsys.readouterr().out
    run_main(module, *args, "--out", stopped, "--resume")
    assert metrics_without_speed(stopped / "metrics.csv") == metrics_without_speed(tmp_path / "whole" / "metrics.csv")
    assert results(stopped)["top1" if script == "deit.py" else "ensemble_top1"] == \
        results(tmp_path / "whole")["top1" if script == "deit.py" else "ensemble_top1"]


@pytest.mark.parametrize("lr, min_lr, epochs, warmup_epochs, steps_per_epoch", [
    (5e-3 * 64 / 512, 1e-5, 100, 5, 31),  # the DML table's setting
    (5e-4, 1e-5, 3, 5, 7),  # a warm-up cut to a fifth of a short run
    (1e-3, 1e-2, 10, 0, 4),  # no warm-up, and --min-lr above --lr
])
def test_cosine_schedule_is_timms_float_for_float(lr, min_lr, epochs, warmup_epochs, steps_per_epoch):
    """The function of the step that replaced timm's CosineLRScheduler object gives the same
    floats at every step (so no run's numbers changed), and past the end stays at its floor."""
    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    warmup = int(min(warmup_epochs, epochs / 5) * steps_per_epoch)
    timm = CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch - warmup, lr_min=min(min_lr, lr),
                             warmup_t=warmup, warmup_lr_init=lr / 100, warmup_prefix=True, t_in_epochs=False)
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            timm.step_update(epoch * steps_per_epoch + step)
            assert cosine_schedule(lr, min_lr, epochs, warmup_epochs, epoch, step, steps_per_epoch) == \
                optimizer.param_groups[0]["lr"], (epoch, step)
    assert cosine_schedule(lr, min_lr, epochs, warmup_epochs, epochs, 0, steps_per_epoch) == min(min_lr, lr)


@pytest.mark.parametrize("flag, value, message", [
    ("warmup_epochs", float("nan"), "--warmup-epochs must be a finite number, got nan"),
    ("lr", float("inf"), "--lr must be a finite number, got inf"),
    ("min_lr", -1.0, "--min-lr must not be negative, got -1.0"),
    ("seed", 2**32, "--seed must be below 2\\*\\*32, got 4294967296"),
])
def test_shared_flags_refuse_nan_inf_and_out_of_range(flag, value, message):
    from common.launch import check_shared_flags

    args = argparse.Namespace(seed=0, lr=1e-3, warmup_epochs=5.0, min_lr=1e-5)
    setattr(args, flag, value)
    with pytest.raises(UserError, match=message):
        check_shared_flags(args)


def test_eval_never_overwrites_a_file_in_a_folder_that_is_not_a_run_folder(tmp_path):
    (tmp_path / "eval.json").write_text("mine")
    args = argparse.Namespace(out=str(tmp_path), eval="x.ckpt", resume=False, overwrite=False)
    with pytest.raises(UserError, match="eval.json exists and .* is not a run folder"):
        open_run_folder(FakeFabric(), args, "dml")
    assert (tmp_path / "eval.json").read_text() == "mine"


def test_another_scripts_run_folder_is_never_resumed_overwritten_and_extend_is_not_inherited(tmp_path):
    import shutil

    import deit
    import dml
    import takd
    from conftest import run_main, snapshot

    run = tmp_path / "dml_run"
    common = ["--students", "vit_micro", "vit_micro", "--train-subset", "100", "--batch-size", "50"]
    run_main(dml, *common, "--epochs", "1", "--out", run)
    before = snapshot(run)
    with pytest.raises(UserError, match="was made by dml.py, not takd.py: give it to dml.py"):
        run_main(takd, "--chain", "plain4", "plain2", "--epochs", "1", "--train-subset", "100", "--batch-size", "50",
                 "--out", run, "--resume")
    with pytest.raises(UserError, match="is a run of dml.py, and deit.py replaces only its own runs"):
        run_main(deit, "--model", "deit_micro", "--epochs", "1", "--train-subset", "100", "--batch-size", "50",
                 "--out", run, "--overwrite")
    assert snapshot(run) == before  # nothing trained into it, nothing deleted
    # an extended run's files do not carry --extend into --config or --eval
    run_main(dml, *common, "--epochs", "2", "--out", run, "--resume", "--extend")
    assert not dml.parse_args(["--config", str(run / "args.json")]).extend
    assert not dml.parse_args(["--eval", str(run / "last.ckpt")]).extend
    # a last.ckpt with a NaN weight is not resumed (nor its results overwritten)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(run, poisoned)
    checkpoint = torch.load(poisoned / "last.ckpt", weights_only=True)
    next(iter(checkpoint["student0"].values())).view(-1)[0] = float("nan")
    torch.save(checkpoint, poisoned / "last.ckpt")
    results_before = (poisoned / "results.json").read_bytes()
    with pytest.raises(UserError, match="holds NaN or infinite weights: not resumed"):
        run_main(dml, *common, "--epochs", "2", "--out", poisoned, "--resume")
    assert (poisoned / "results.json").read_bytes() == results_before


def test_config_with_eval_still_checks_the_checkpoints_script(tmp_path, capsys):
    import deit
    import dml

    dml_args = vars(dml.parse_args(["--students", "resnet8", "resnet8"]))
    torch.save({"args": dml_args}, tmp_path / "dml.ckpt")
    (tmp_path / "args.json").write_text(json.dumps(vars(deit.parse_args([]))))
    with pytest.raises(SystemExit):
        deit.parse_args(["--config", str(tmp_path / "args.json"), "--eval", str(tmp_path / "dml.ckpt")])
    assert "--eval " in (err := capsys.readouterr().err) and "was made by dml.py, not deit.py" in err


def test_metrics_csv_takes_columns_a_newer_script_adds(tmp_path):
    """A run resumed by a version of its script that writes more columns (dml's top-5 columns, say): the
    earlier rows keep their values and leave the new columns empty."""
    from common.folder import write_csv

    write_csv(tmp_path / "metrics.csv", [{"epoch": 1, "top1_0": 10.0}, {"epoch": 2, "top1_0": 12.0, "top5_0": 50.0}])
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,top1_0,top5_0", "1,10.0,", "2,12.0,50.0"]
