"""dml.py end to end on the embedded data: run folders, modes, resume, DDP and bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, kill_after_first_epoch, run_script

QUICK = ["--epochs", "3", "--train-subset", "1000", "--batch-size", "50", "--lr", "2e-3"]


def results(folder):
    return json.loads((folder / "results.json").read_text())


def test_dml_run_folder(run, tmp_path):
    out = tmp_path / "run"
    result = run("dml.py", "--students", "vit_micro", "resnet8", *QUICK, "--out", out)
    for name in ("args.json", "metrics.csv", "results.json", "last.ckpt", "best.ckpt", "curves.png"):
        assert (out / name).is_file(), name
    res = results(out)
    assert res["method"] == "dml" and res["mode"] == "dml" and res["dataset"] == "cifar10-mini"
    assert res["epochs"] == 3 and res["seed"] == 0 and res["train_img_per_s"] > 0 and res["wall_s"] > 0
    assert [s["name"] for s in res["students"]] == ["vit_micro", "resnet8"]
    for student in res["students"]:
        assert student["params"] > 0 and 0 <= student["top1"] <= student["top5"] <= 100
    assert res["ensemble_top1"] > 20  # chance is 10 %
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("epoch", "lr", "loss_0", "ce_0", "kl_0", "loss_1", "top1_0", "top1_1", "top1_ensemble",
                   "img_per_s"):
        assert column in header
    assert len((out / "metrics.csv").read_text().splitlines()) == 4
    assert "ensemble" in result.stdout  # the summary table


def test_modes_share_initial_weights_and_kl_only_in_dml(run, tmp_path):
    # With a vanishing learning rate the weights after one epoch are the initial ones.
    for mode in ("dml", "independent"):
        run("dml.py", "--students", "vit_micro", "vit_micro", "--mode", mode, "--epochs", "1", "--landscape",
            "--train-subset", "100", "--batch-size", "50", "--lr", "1e-12", "--out", tmp_path / mode)
    dml = torch.load(tmp_path / "dml" / "last.ckpt", weights_only=False)
    independent = torch.load(tmp_path / "independent" / "last.ckpt", weights_only=False)
    for key in dml["student0"]:
        assert torch.allclose(dml["student0"][key], independent["student0"][key], atol=1e-8), key
    assert not torch.equal(dml["student0"]["cls_token"], dml["student1"]["cls_token"])  # two different students
    assert dml["history"][0]["kl_0"] > 0 and independent["history"][0]["kl_0"] == 0
    # same data, same initial weights: the same CE at the start
    assert dml["history"][0]["ce_0"] == pytest.approx(independent["history"][0]["ce_0"], rel=1e-3)
    landscape = (tmp_path / "dml" / "landscape.csv").read_text().splitlines()
    assert landscape[0] == "student,sigma,loss_mean,loss_std" and len(landscape) == 1 + 2 * 9
    assert (tmp_path / "dml" / "landscape.png").is_file()
    run("-m", "common.landscape", tmp_path / "dml", tmp_path / "independent", "--out", tmp_path / "both.png")
    assert (tmp_path / "both.png").stat().st_size > 10_000


def test_deit_students(run, tmp_path):
    out = tmp_path / "deit"
    run("dml.py", "--students", "deit_micro", "deit_micro", "--epochs", "1", "--train-subset", "200",
        "--batch-size", "100", "--out", out)
    res = results(out)
    assert all(s["distillation_token"] for s in res["students"])
    assert res["students"][0]["params"] > 0


def test_resume_after_sigkill_matches_uninterrupted(run, tmp_path):
    args = ["dml.py", "--students", "vit_micro", "vit_micro", "--epochs", "3", "--train-subset", "600",
            "--batch-size", "30", "--lr", "2e-3"]
    run(*args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_after_first_epoch(*args, out=killed)
    run(*args, "--out", killed, "--resume")
    whole, resumed = results(tmp_path / "whole"), results(killed)
    assert [s["top1"] for s in resumed["students"]] == [s["top1"] for s in whole["students"]]
    assert resumed["ensemble_top1"] == whole["ensemble_top1"]
    drop = ("img_per_s",)
    strip = lambda text: [line.rsplit(",", len(drop))[0] for line in text.splitlines()]
    assert strip((killed / "metrics.csv").read_text()) == strip((tmp_path / "whole" / "metrics.csv").read_text())


def test_two_process_ddp(tmp_path):
    out = tmp_path / "ddp"
    fabric = os.path.join(os.path.dirname(sys.executable), "fabric")
    result = subprocess.run([fabric, "run", "--accelerator", "cpu", "--devices", "2", "dml.py", "--students",
                             "vit_micro", "vit_micro", "--epochs", "1", "--train-subset", "200", "--batch-size",
                             "100", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    res = results(out)
    assert res["world_size"] == 2 and len(res["students"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "best.ckpt", "curves.png", "last.ckpt",
                                                     "metrics.csv", "results.json"]


# --- bad input: one line, non-zero exit, nothing overwritten -------------------


@pytest.mark.parametrize("flags, message", [
    (["--students", "vit_nonexistent", "vit_micro"], "unknown model 'vit_nonexistent'"),
    (["--students", "vit_micro"], "at least two students"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/data"], "does not exist"),
    (["--dataset", "cifar10"], "needs --data-dir"),
])
def test_bad_input(run, tmp_path, flags, message):
    result = run("dml.py", "--students", "vit_micro", "vit_micro", "--train-subset", "50", *flags,
                 "--out", tmp_path / "run", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run_script("dml.py", "--students", "vit_micro", "vit_micro", "--epochs", "1", "--train-subset", "100",
               "--batch-size", "50", "--out", out)
    return out


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def bad_run(run, out, *flags):
    result = run("dml.py", "--students", "vit_micro", "vit_micro", "--epochs", "2", "--train-subset", "100",
                 "--batch-size", "50", "--out", out, *flags, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_existing_run_folder_is_refused(run, finished_run):
    before = snapshot(finished_run)
    assert "exists and is not empty" in bad_run(run, finished_run)
    assert snapshot(finished_run) == before


def test_resume_with_other_students_is_refused(run, finished_run):
    before = snapshot(finished_run)
    result = run("dml.py", "--students", "vit_micro", "resnet8", "--epochs", "2", "--train-subset", "100",
                 "--out", finished_run, "--resume", check=False)
    assert result.returncode == 2 and "students" in result.stderr.splitlines()[-1]
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_bad_checkpoint_on_resume(run, tmp_path, finished_run, damage):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    checkpoint = out / "last.ckpt"
    if damage == "truncate":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    else:
        torch.save({"weights": torch.zeros(3)}, checkpoint)
    before = snapshot(out)
    message = bad_run(run, out, "--resume")
    assert "last.ckpt" in message
    assert snapshot(out) == before


def test_nan_loss_stops_and_keeps_the_checkpoint(run, tmp_path, finished_run):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    message = bad_run(run, out, "--resume", "--lr", "1e35")
    assert "the loss became" in message and "epoch 2, step" in message
    assert snapshot(out) == before
