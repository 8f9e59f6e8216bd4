"""dml.py end to end on the embedded data: run folder, modes, DeiT students, resume, DDP and bad input."""
import csv
import json
import re
import shutil

import pytest
import torch

import dml
from common.folder import plot_curves
from common.landscape import compare as compare_landscapes
from common.launch import UserError
from conftest import (fabric_run, kill_when, metrics_without_speed, png_size, results, run_main, run_script,
                      snapshot)

QUICK = ["--epochs", "3", "--train-subset", "1000", "--batch-size", "50", "--lr", "2e-3"]


def test_dml_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    run_main(dml, "--students", "vit_micro", "resnet8", *QUICK, "--train-subset", "1250", "--val-split", "0.2",
             "--out", out)
    for name in ("args.json", "metrics.csv", "results.json", "last.ckpt", "best.ckpt"):
        assert (out / name).is_file(), name
    res = results(out)
    assert res["method"] == "dml" and res["mode"] == "dml" and res["dataset"] == "cifar10-mini"
    assert res["epochs"] == 3 and res["seed"] == 0 and res["train_img_per_s"] > 0 and res["wall_s"] > 0
    assert [s["name"] for s in res["students"]] == ["vit_micro", "resnet8"]
    for student in res["students"]:
        assert student["params"] > 0 and 15 < student["top1"] <= student["top5"]  # chance is 10 %
    assert res["ensemble_top1"] > 20
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    for row in rows:  # the backpropagated loss is the sum of each student's CE and KL
        terms = [float(row[f"loss_{term}_{k}"]) for k in (0, 1) for term in ("ce", "kl")]
        assert float(row["loss"]) == pytest.approx(sum(terms), rel=1e-5) and all(term > 0 for term in terms)
    assert float(rows[-1]["top1_ensemble"]) == res["ensemble_top1"]
    # best.ckpt is the epoch best on the 250 held-out training images, not on the test split
    assert res["best_on"] == "validation" and res["dml_target"] == "prediction"
    val = [float(row["val_top1_ensemble"]) for row in rows]
    assert torch.load(out / "best.ckpt", weights_only=False)["epoch"] == 1 + val.index(max(val))
    assert "ensemble" in capsys.readouterr().out  # the summary table
    # the default CSV logger: losses at every log point and each epoch's record
    logged = list(csv.DictReader(open(out / "logs" / "version_0" / "metrics.csv")))
    assert any(row.get("train/loss_ce_0") for row in logged) and any(row.get("epoch/top1_ensemble") for row in logged)
    # the curves: each student's CE and KL, every accuracy (validation dashed), the learning rate
    assert png_size(out / "curves.png") == (1500, 400)
    fig = plot_curves(tmp_path / "again.png", rows, dml.curve_panels(res_names(res)))
    losses, accuracies, rate, kl_axis = fig.axes  # the KL (≈ 0.01) on its own axis, right of the CE (≈ 2)
    assert [line.get_label() for line in losses.get_lines()] == ["total, all students", "0: vit_micro CE",
                                                                 "1: resnet8 CE"]
    assert [line.get_label() for line in kl_axis.get_lines()] == ["0: vit_micro KL (right axis)",
                                                                "1: resnet8 KL (right axis)"]
    assert [text.get_text() for text in losses.get_legend().get_texts()] == [
        "total, all students", "0: vit_micro CE", "1: resnet8 CE", "0: vit_micro KL (right axis)",
        "1: resnet8 KL (right axis)"]
    assert [line.get_label() for line in accuracies.get_lines()] == [
        "0: vit_micro", "1: resnet8", "ensemble",
        "0: vit_micro (validation)", "1: resnet8 (validation)", "ensemble (validation)", "agreement of the students"]
    test_line, validation_line = accuracies.get_lines()[0], accuracies.get_lines()[3]
    assert validation_line.get_color() == test_line.get_color()  # a student's two lines in one colour,
    assert (validation_line.get_linestyle(), validation_line.get_marker()) != (test_line.get_linestyle(),
                                                                              test_line.get_marker())  # told apart
    assert validation_line.get_markerfacecolor() == "none"
    assert accuracies.get_lines()[2].get_linewidth() > test_line.get_linewidth()  # the ensemble stands out
    assert list(accuracies.get_lines()[2].get_ydata()) == [float(row["top1_ensemble"]) for row in rows]
    assert list(kl_axis.get_lines()[1].get_xdata()) == [1, 2, 3] and kl_axis.get_lines()[1].get_marker() == "o"
    assert all(tick == int(tick) for tick in losses.get_xticks())  # whole epochs
    assert list(rate.get_lines()[0].get_ydata()) == [float(row["lr"]) for row in rows]


def res_names(res):
    return [student["name"] for student in res["students"]]


def test_modes_share_initial_weights_and_kl_only_in_dml(tmp_path):
    # With a vanishing learning rate the weights after one epoch are the initial ones.
    for mode in ("dml", "independent"):
        run_main(dml, "--students", "vit_micro", "vit_micro", "--mode", mode, "--epochs", "1", "--landscape",
                 "--train-subset", "100", "--batch-size", "50", "--lr", "1e-12", "--out", tmp_path / mode)
    dml_run = torch.load(tmp_path / "dml" / "last.ckpt", weights_only=False)
    independent = torch.load(tmp_path / "independent" / "last.ckpt", weights_only=False)
    for key in dml_run["student0"]:
        assert torch.allclose(dml_run["student0"][key], independent["student0"][key], atol=1e-8), key
    assert not torch.equal(dml_run["student0"]["cls_token"], dml_run["student1"]["cls_token"])  # two students
    assert dml_run["history"][0]["loss_kl_0"] > 0 and "loss_kl_0" not in independent["history"][0]
    # same data, same initial weights: the same CE at the start
    assert dml_run["history"][0]["loss_ce_0"] == pytest.approx(independent["history"][0]["loss_ce_0"], rel=1e-3)
    landscape = list(csv.DictReader(open(tmp_path / "dml" / "landscape.csv")))
    assert len(landscape) == 2 * 9 and {row["student"] for row in landscape} == {"0:vit_micro", "1:vit_micro"}
    clean, noisiest = landscape[0], landscape[8]
    assert float(clean["sigma"]) == 0 and float(clean["loss_std"]) == 0 and float(noisiest["loss_std"]) > 0
    assert png_size(tmp_path / "dml" / "landscape.png") == (1000, 400)  # a panel per student
    # both runs compared: a panel per student, one line (colour) per run, the CSV's means against σ
    fig = compare_landscapes([tmp_path / "dml", tmp_path / "independent"], tmp_path / "both.png")
    assert [ax.get_title() for ax in fig.axes] == ["student 0:vit_micro", "student 1:vit_micro"]
    for ax in fig.axes:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["dml", "independent"]
        assert lines[0].get_color() != lines[1].get_color()
    first = fig.axes[0].get_lines()[0]
    assert list(first.get_xdata()) == [float(row["sigma"]) for row in landscape[:9]]
    assert list(first.get_ydata()) == pytest.approx([float(row["loss_mean"]) for row in landscape[:9]])


def test_deit_students(tmp_path):
    import argparse

    from common.models import create_model

    # student_losses: a DeiT's CE reaches its class head, its KL its distillation head, and never a peer
    torch.manual_seed(0)
    students = [create_model("deit_micro", 10, 32).train() for _ in range(2)]
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    terms = dml.student_losses(students, images, labels, argparse.Namespace(mode="dml", smoothing=0.0,
                                                                           dml_target="prediction"))
    terms["ce_0"].backward(retain_graph=True)
    assert students[0].head.weight.grad.abs().sum() > 0 and students[0].head_dist.weight.grad is None
    students[0].zero_grad(set_to_none=True)
    terms["kl_0"].backward()
    assert students[0].head_dist.weight.grad.abs().sum() > 0 and students[0].head.weight.grad is None
    assert all(p.grad is None for p in students[1].parameters())  # the peer's prediction is a detached target
    # and a run of two DeiTs logs both terms of each
    out = tmp_path / "deit"
    run_main(dml, "--students", "deit_micro", "deit_micro", "--epochs", "1", "--train-subset", "200",
             "--batch-size", "100", "--out", out)
    res, row = results(out), next(csv.DictReader(open(out / "metrics.csv")))
    assert all(s["distillation_token"] for s in res["students"])
    assert all(float(row[f"loss_{term}_{k}"]) > 0 for term in ("ce", "kl") for k in (0, 1))


@pytest.mark.parametrize("target", ["prediction", "distillation"])
def test_dml_target_of_a_deit_head(target):
    import argparse

    from common.losses import kl_divergence
    from common.models import create_model, prediction, split_heads

    torch.manual_seed(0)
    students = [create_model("deit_micro", 10, 32).train(), create_model("vit_micro", 10, 32).train()]
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.manual_seed(1)  # the same drop-path draws for the terms and for the hand computation
    terms = dml.student_losses(students, images, labels, argparse.Namespace(mode="dml", smoothing=0.0,
                                                                           dml_target=target))
    torch.manual_seed(1)
    deit_out, vit_out = (student(images) for student in students)
    peer_of_vit = prediction(deit_out) if target == "prediction" else split_heads(deit_out)[1]
    # the DeiT's distillation head mimics the ViT's only output either way; the ViT mimics the chosen DeiT output
    assert terms["kl_0"].item() == pytest.approx(kl_divergence(vit_out, deit_out[1]).item(), rel=1e-4)
    assert terms["kl_1"].item() == pytest.approx(kl_divergence(peer_of_vit, vit_out).item(), rel=1e-4)


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    args = ["--students", "vit_micro", "vit_micro", "--epochs", "3", "--train-subset", "300", "--batch-size", "30",
            "--lr", "2e-3", "--eval-every", "3"]  # a test at the end only: the test split is most of the time
    run_main(dml, *args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_when("dml.py", *args, out=killed, marker=killed / "metrics.csv")
    assert torch.load(killed / "last.ckpt", weights_only=False)["epoch"] < 3
    run_main(dml, *args, "--out", killed, "--resume")
    whole, resumed = results(tmp_path / "whole"), results(killed)
    assert [s["top1"] for s in resumed["students"]] == [s["top1"] for s in whole["students"]]
    assert resumed["ensemble_top1"] == whole["ensemble_top1"]
    assert metrics_without_speed(killed / "metrics.csv") == metrics_without_speed(tmp_path / "whole" / "metrics.csv")


def test_two_process_ddp(tmp_path):
    out = tmp_path / "ddp"
    fabric_run("dml.py", "--students", "vit_micro", "vit_micro", "--epochs", "1", "--train-subset", "200",
               "--batch-size", "100", "--out", out)
    res = results(out)
    assert res["world_size"] == 2 and len(res["students"]) == 2
    # the two processes' test counts add up to one pass over the test split: one process evaluating
    # the saved students finds the same accuracies (up to bf16 batches of another size)
    run_main(dml, "--eval", out / "last.ckpt", "--out", tmp_path / "eval")
    alone = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert alone["ensemble_top1"] == pytest.approx(res["ensemble_top1"], abs=0.3)
    for together, single in zip(res["students"], alone["students"]):
        assert single["top1"] == pytest.approx(together["top1"], abs=0.3)
    assert sorted(p.name for p in out.iterdir()) == [".kd_run", "args.json", "best.ckpt", "curves.png", "last.ckpt",
                                                     "logs", "metrics.csv", "results.json", "student0.safetensors",
                                                     "student1.safetensors"]


# --- what timm and DeiT users expect ------------------------------------------------


def test_ema_clipping_accumulation_tensorboard_and_weights_out(tmp_path):
    import json

    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    from common.models import create_model

    out = tmp_path / "run"
    run_main(dml, "--students", "vit_micro", "resnet8", "--epochs", "2", "--train-subset", "400", "--batch-size", "50",
             "--model-ema", "--clip-grad", "1.0", "--grad-accum-steps", "2",
             "--logger", "tensorboard", "--out", out)
    res = results(out)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    for k, student in enumerate(res["students"]):  # the averaged weights are evaluated each epoch
        assert float(rows[-1][f"ema_top1_{k}"]) == student["ema_top1"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = torch.load(out / "last.ckpt", weights_only=True)
    assert saved["ema0"].keys() == {f"module.{key}" for key in saved["student0"]}
    # DeiT's decay 0.99996 after timm's warm-up: in 8 steps the average moves most of the way the weights
    # moved from their initial values (without the warm-up it would stay at them: a 10 % network)
    torch.manual_seed(0)
    initial = create_model("vit_micro", 10, 32).state_dict()
    moved = lambda weights: sum((weights[key].float() - initial[key]).norm() for key in initial if "weight" in key)
    assert moved({key: saved["ema0"][f"module.{key}"] for key in initial}) > 0.5 * moved(saved["student0"])
    # batches of 50, two per step: the lr is scaled by the effective batch of 100 (a peak of 5e-3 · 100/512),
    # and after one epoch of the cosine it is still above the peak a batch of 50 would give
    assert 5e-3 * 50 / 512 < float(rows[0]["lr"]) <= 5e-3 * 100 / 512
    for k, name in enumerate(("vit_micro", "resnet8")):  # weights out: plain load_state_dict, strict
        model = create_model(name, 10, 32)
        model.load_state_dict(load_file(out / f"student{k}.safetensors"))
        assert torch.equal(model.state_dict()[next(iter(saved[f"student{k}"]))],
                           saved[f"student{k}"][next(iter(saved[f"student{k}"]))])
        ema = load_file(out / f"ema{k}.safetensors")  # the averaged weights too
        assert all(torch.equal(ema[key], saved[f"ema{k}"][f"module.{key}"]) for key in ema)
        assert (out / f"student{k}.safetensors").stat().st_mode & 0o777 == 0o644  # group-readable
    # the metadata rebuilds a ViT with timm alone, for the data it was trained on
    with safe_open(out / "student0.safetensors", "pt") as file:
        metadata = file.metadata()
    assert metadata["model"] == "vit_micro" and json.loads(metadata["classes"])[0] == "airplane"
    assert metadata["img_size"] == "32" and len(json.loads(metadata["mean"])) == 3
    rebuilt = timm.create_model(metadata["timm_model"], **json.loads(metadata["timm_kwargs"]))
    rebuilt.load_state_dict(load_file(out / "student0.safetensors"))


def test_eval_reproduces_the_last_accuracies_and_config_restarts_a_run(tmp_path, finished_run):
    run = tmp_path / "eval"  # --eval into the run's own folder adds eval.json and changes nothing of the run
    shutil.copytree(finished_run, run)
    kept = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    for flag in ("--overwrite", "--resume"):
        with pytest.raises(UserError, match=f"never replaces or continues a run: leave out {flag}"):
            run_main(dml, "--eval", run / "last.ckpt", "--out", run, flag)
    run_main(dml, "--eval", run / "last.ckpt", "--out", run)
    assert {name: (run / name).read_bytes() for name in kept} == kept
    evaluated, trained = json.loads((run / "eval.json").read_text()), results(finished_run)
    assert [s["top1"] for s in evaluated["students"]] == [s["top1"] for s in trained["students"]]
    assert evaluated["ensemble_top1"] == trained["ensemble_top1"] and evaluated["epochs_trained"] == 1
    # --config: the run's arguments, a flag overriding one of them
    args = dml.parse_args(["--config", str(finished_run / "args.json"), "--epochs", "3"])
    assert args.students == ["vit_micro", "vit_micro"] and args.train_subset == 100 and args.epochs == 3


def test_pretrained_weights_are_resampled_as_timm_does(tmp_path, capsys):
    import timm

    from common.models import create_model, load_pretrained

    torch.manual_seed(0)
    imagenet = timm.create_model("vit_tiny_patch16_224", num_classes=1000)  # 224 px, 16-pixel patches
    torch.save(imagenet.state_dict(), tmp_path / "vit_tiny_imagenet.pth")
    model = create_model("vit_tiny", 10, 32)  # 32 px, 4-pixel patches, 10 classes
    report = load_pretrained(model, tmp_path / "vit_tiny_imagenet.pth")
    assert report["resampled"] == ["patch_embed.proj.weight", "pos_embed"]
    assert report["skipped"] == ["head.bias", "head.weight"] and report["loaded"] == len(model.state_dict()) - 2
    assert torch.equal(model.blocks[0].attn.qkv.weight, imagenet.blocks[0].attn.qkv.weight)
    # a file of another network is refused, not silently half-loaded
    torch.save(create_model("resnet8", 10, 32).state_dict(), tmp_path / "resnet8.pth")
    with pytest.raises(UserError, match="does not fit VisionTransformer: only 0 of"):
        load_pretrained(model, tmp_path / "resnet8.pth")
    out = tmp_path / "run"
    torch.save(create_model("vit_micro", 10, 32).state_dict(), tmp_path / "vit_micro.pth")
    run_main(dml, "--students", "vit_tiny", "vit_micro", "--pretrained", tmp_path / "vit_tiny_imagenet.pth",
             tmp_path / "vit_micro.pth", "--epochs", "1", "--train-subset", "100", "--batch-size", "50",
             "--out", out)
    reported = results(out)["pretrained"]
    assert [r["file"] for r in reported] == [str(tmp_path / "vit_tiny_imagenet.pth"), str(tmp_path / "vit_micro.pth")]
    assert reported[0]["resampled"] == ["patch_embed.proj.weight", "pos_embed"] and reported[1]["skipped"] == []
    assert "pos_embed" in capsys.readouterr().out


def test_weight_decay_spares_norms_biases_embeddings_and_tokens():
    from common.models import create_model, weight_decay_groups

    model = create_model("deit_tiny", 10, 32)
    spared, decayed = weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert {"pos_embed", "cls_token", "dist_token", "norm.weight", "head.bias"} <= spared_names
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decayed["params"])
    assert decayed["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(spared["params"]) == len(list(model.parameters()))


def test_unknown_model_suggests_the_nearest_names():
    from common.models import create_model

    with pytest.raises(UserError, match="unknown model 'vit_tinny': did you mean vit_tiny"):
        create_model("vit_tinny", 10, 32)


# --- bad input: one line, non-zero exit, nothing overwritten -------------------


def test_bad_input_is_one_line_and_status_2(tmp_path):
    result = run_script("dml.py", "--students", "vit_nonexistent", "vit_micro", "--out", tmp_path / "run",
                        check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown model 'vit_nonexistent': use one of")


@pytest.mark.parametrize("flags, message", [
    (["--students", "vit_nonexistent", "vit_micro"], "unknown model 'vit_nonexistent'"),
    (["--students", "vit_micro"], "at least two students"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/data"], "does not exist"),
    (["--dataset", "cifar10"], "needs --data-dir"),
    (["--resume"], "--resume needs --out"),
    (["--seed", "-1"], "--seed must not be negative"),
    (["--split-seed", "-2"], "--split-seed must not be negative"),
    (["--smoothing", "1.5"], r"--smoothing must lie in \[0, 1\)"),
    (["--drop-path", "-0.1"], r"--drop-path must lie in \[0, 1\)"),
    (["--model-ema", "--model-ema-decay", "1.2"], r"--model-ema-decay must lie in \[0, 1\)"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must not be negative"),
    (["--eval-every", "0"], "--eval-every must be positive"),
    (["--patch-size", "5"], "--patch-size 5 does not divide the image size 32"),
    (["--train-subset", "5"], r"--train-subset must be between the number of classes \(10\)"),
    (["--batch-size", "64"], "^--batch-size 64 exceeds the 50 training images"),  # one batch padded with black images
    (["--grad-accum-steps", "2"], "^--grad-accum-steps 2 is more than the 1 batches of an epoch"),
])
def test_bad_input(tmp_path, flags, message):
    out = [] if "--resume" in flags else ["--out", tmp_path / "run"]
    with pytest.raises(UserError, match=message):
        run_main(dml, "--students", "vit_micro", "vit_micro", "--train-subset", "50", "--batch-size", "50", *flags,
                 *out)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run_main(dml, "--students", "vit_micro", "vit_micro", "--epochs", "1", "--train-subset", "100",
             "--batch-size", "50", "--out", out)
    return out


def bad_run(out, *flags, students=("vit_micro", "vit_micro")):
    with pytest.raises(UserError) as error:
        run_main(dml, "--students", *students, "--epochs", "2", "--train-subset", "100", "--batch-size", "50",
                 "--out", out, *flags)
    return str(error.value)


def test_existing_run_folder_is_refused(finished_run):
    before = snapshot(finished_run)
    assert "exists and is not empty" in bad_run(finished_run)
    assert snapshot(finished_run) == before


def test_resume_with_other_students_is_refused(finished_run):
    before = snapshot(finished_run)
    assert "students" in bad_run(finished_run, "--resume", students=("vit_micro", "resnet8"))
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_bad_checkpoint_on_resume(tmp_path, finished_run, damage):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    checkpoint = out / "last.ckpt"
    if damage == "truncate":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    else:
        torch.save({"weights": torch.zeros(3)}, checkpoint)
    before = snapshot(out)
    assert "last.ckpt" in bad_run(out, "--resume", "--epochs", "1")  # the run's arguments: the checkpoint is read
    assert snapshot(out) == before


def test_nan_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    calls, real = [], dml.student_losses

    def poisoned(*args):  # the third step, the first of epoch 2, goes NaN
        calls.append(1)
        terms = real(*args)
        return {name: term * float("nan") for name, term in terms.items()} if len(calls) == 3 else terms

    monkeypatch.setattr(dml, "student_losses", poisoned)
    out = tmp_path / "run"
    message = bad_run(out)  # 2 epochs of 2 steps
    assert "the loss became NaN or infinite at epoch 2, step 1: stopped" in message and "last.ckpt" in message
    assert torch.load(out / "last.ckpt", weights_only=False)["epoch"] == 1  # the last good one
    assert not (out / "results.json").exists()


def test_eval_every_agreement_and_train_top1(tmp_path):
    out = tmp_path / "run"
    run_main(dml, "--students", "resnet8", "resnet8", "--epochs", "3", "--train-subset", "200", "--batch-size", "50",
             "--eval-every", "2", "--out", out)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [row["top1_ensemble"] != "" for row in rows] == [False, True, True]  # every 2nd epoch and the last
    assert [row["agreement"] != "" for row in rows] == [False, True, True]
    assert torch.load(out / "best.ckpt", weights_only=False)["epoch"] in (2, 3)  # chosen among evaluated epochs
    res = results(out)
    assert res["agreement"] == float(rows[-1]["agreement"]) and 0 <= res["agreement"] <= 100
    assert all(0 <= student["train_top1"] <= 100 for student in res["students"])


def test_identical_students_agree_on_every_image():
    from common.data import load_dataset, make_loader
    from common.models import create_model
    from conftest import FakeFabric

    torch.manual_seed(0)
    model, other = create_model("resnet8", 10, 32), create_model("resnet8", 10, 32)
    loader = make_loader(load_dataset("cifar10-mini"), "test", 64, FakeFabric())
    alike = dml.evaluate([model, model], loader, FakeFabric())
    assert alike["agreement"] == 100.0 and alike["top1_0"] == alike["top1_1"] == alike["top1_ensemble"]
    assert "ema_top1_0" not in alike and alike["top5_0"] >= alike["top1_0"]
    assert dml.evaluate([model, model], None, FakeFabric()) == dict.fromkeys(alike)  # an epoch without a test
    # the EMA copies in the same pass over the data, outside the ensemble and the agreement
    passes = []
    epoch = loader.epoch
    loader.epoch = lambda *args: passes.append(1) or epoch(*args)
    with_emas = dml.evaluate([model, model], loader, FakeFabric(), [other, model])
    assert len(passes) == 1 and {key: with_emas[key] for key in alike} == alike
    alone = dml.evaluate([other, other], loader, FakeFabric())
    assert with_emas["ema_top1_1"] == alike["top1_0"] and with_emas["ema_top1_0"] == alone["top1_0"]


def test_ones_own_model_by_model_module(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "from timm.models import register_model\n\n\n"
        "@register_model\n"
        "def tiny_mlp(num_classes=10, **kwargs):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    run_main(dml, "--model-module", "mymodels", "--students", "tiny_mlp", "vit_micro", "--epochs", "1",
             "--train-subset", "100", "--batch-size", "50", "--out", out)
    assert [student["name"] for student in results(out)["students"]] == ["tiny_mlp", "vit_micro"]
    with pytest.raises(UserError, match="--model-module no_such_package: cannot import it"):
        run_main(dml, "--model-module", "no_such_package", "--out", tmp_path / "other")


def test_diverging_weights_never_reach_a_checkpoint(tmp_path):
    """--lr 1e6: an update can make the weights NaN while the loss that made it was
    still finite; no checkpoint with non-finite weights may be written."""
    out = tmp_path / "run"
    message = bad_run(out, "--lr", "1e6", "--warmup-epochs", "0", "--smoothing", "0", "--drop-path", "0")
    assert "NaN or infinite" in message and "stopped" in message
    if (out / "last.ckpt").exists():
        assert "the last good checkpoint is" in message
        saved = torch.load(out / "last.ckpt", weights_only=False)
        assert all(torch.isfinite(t).all() for key in ("student0", "student1") for t in saved[key].values()
                   if t.is_floating_point())
    else:
        assert "the last good checkpoint" not in message


@pytest.mark.parametrize("flags, allowed", [(["--lr", "1e-3"], False), (["--epochs", "3"], False),
                                            (["--seed", "1"], False), (["--log-every", "7"], True)])
def test_resume_refuses_a_change_that_shapes_the_run(tmp_path, finished_run, flags, allowed):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    args = ["--students", "vit_micro", "vit_micro", "--epochs", "1", "--train-subset", "100", "--batch-size", "50",
            "--resume", "--out", out]
    if allowed:
        run_main(dml, *args, *flags)
    else:
        with pytest.raises(UserError, match=f"cannot resume .*it was made with {flags[0]} "):
            run_main(dml, *args, *flags)


def test_flags_without_effect_get_a_note(capsys):
    dml.check_args(dml.parse_args(["--model-ema-decay", "0.9"]))
    assert "note: --model-ema-decay has no effect without --model-ema" in capsys.readouterr().out


def test_extend_trains_a_finished_run_on_with_its_schedule_stretched(tmp_path, capsys):
    common = ["--students", "vit_micro", "vit_micro", "--train-subset", "100", "--batch-size", "50",
              "--warmup-epochs", "0"]
    run_main(dml, *common, "--epochs", "3", "--out", tmp_path / "three")
    run_main(dml, *common, "--epochs", "2", "--out", tmp_path / "two")
    capsys.readouterr()
    run_main(dml, *common, "--epochs", "3", "--out", tmp_path / "two", "--resume", "--extend")
    assert "goes on from epoch 2 to 3 (made for 2)" in capsys.readouterr().out
    rates = lambda run: [float(line.split(",")[1]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    extended, three = rates(tmp_path / "two"), rates(tmp_path / "three")
    # epochs 1-2 ran on a 2-epoch cosine, epoch 3 on the 3-epoch one, where the rate rose again
    assert len(extended) == 3 and extended[2] == three[2] and extended[1] < three[1]
    assert results(tmp_path / "two")["extended_from"] == [2] and results(tmp_path / "two")["epochs"] == 3
    assert results(tmp_path / "three")["extended_from"] == []
    assert json.loads((tmp_path / "two" / "args.json").read_text())["epochs"] == 3  # a plain --resume now agrees
    run_main(dml, *common, "--epochs", "3", "--out", tmp_path / "two", "--resume")
    for flags, message in [(["--epochs", "3", "--resume", "--extend"], "give --epochs above the 3"),
                           (["--epochs", "4", "--resume"], r"--epochs 3 \(now 4\)"),
                           (["--epochs", "4", "--extend"], "--extend goes with --resume")]:
        with pytest.raises(UserError, match=message):
            run_main(dml, *common, *flags, "--out", tmp_path / "two")


def test_a_term_added_to_the_loss_function_reaches_metrics_the_epoch_line_and_the_curves(tmp_path, monkeypatch,
                                                                                         capsys):
    plain = dml.student_losses

    def with_a_term(students, images, labels, args):  # the one function a user edits
        terms = plain(students, images, labels, args)
        return {**terms, "confidence": 0.1 * terms["ce_0"]}

    monkeypatch.setattr(dml, "student_losses", with_a_term)
    run_main(dml, "--students", "vit_micro", "vit_micro", "--epochs", "1", "--train-subset", "100",
             "--batch-size", "50", "--out", tmp_path / "run")
    row, = csv.DictReader(open(tmp_path / "run" / "metrics.csv"))
    assert float(row["loss_confidence"]) == pytest.approx(0.1 * float(row["loss_ce_0"]), rel=1e-5)
    terms = [float(value) for column, value in row.items() if column.startswith("loss_")]
    assert float(row["loss"]) == pytest.approx(sum(terms), rel=1e-5)  # the logged loss is the backpropagated sum
    assert re.search(r"epoch 1/1: .*loss_confidence=\d\.\d{3}", capsys.readouterr().out)
    losses = plot_curves(tmp_path / "again.png", [row], dml.curve_panels(["vit_micro", "vit_micro"])).axes[0]
    assert "loss_confidence" in [line.get_label() for line in losses.get_lines()]


def test_eval_says_which_training_flags_have_no_effect_and_reports_the_checkpoints(finished_run, tmp_path, capsys):
    run_main(dml, "--eval", finished_run / "last.ckpt", "--epochs", "50", "--landscape", "--out", tmp_path / "eval")
    assert "--epochs --landscape have no effect" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["epochs"] == 1 and not (tmp_path / "eval" / "landscape.csv").exists()  # not 50, nor drawn


def test_flags_without_effect_get_a_note_and_an_empty_out_is_refused(capsys):
    dml.check_args(dml.parse_args(["--students", "resnet8", "resnet8", "--patch-size", "8"]))
    assert "note: --patch-size has no effect: no student is a ViT" in capsys.readouterr().out
    dml.peak_lr(dml.parse_args(["--batch-size", "64", "--min-lr", "0.1"]))  # the peak: 5e-3 × 64 / 512
    assert "note: --min-lr 0.1 is above the peak rate 0.000625" in capsys.readouterr().out
    with pytest.raises(UserError, match="--out is empty"):
        dml.check_args(dml.parse_args(["--out", ""]))
