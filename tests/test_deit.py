"""deit.py end to end: a teacher run, then students distilled from it."""
import argparse
import csv
import json

import pytest
import torch

import common.data
import deit
from common.folder import plot_curves
from common.launch import UserError
from common.models import create_model
from conftest import kill_when, metrics_without_speed, results, run_main

SMALL = ["--train-subset", "600", "--batch-size", "50", "--lr", "2e-3"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_main(deit, "--model", "resnet8", "--distillation-type", "none", "--recipe", "cifar", "--epochs", "3",
             "--train-subset", "1000", "--batch-size", "50", "--lr", "2e-2", "--out", out)
    return out


def test_teacher_run(teacher):
    res = results(teacher)
    assert res["method"] == "deit" and res["model"] == "resnet8" and res["teacher"] is None
    assert res["distillation_type"] == "none" and res["top1_cls"] is None and res["top1_dist"] is None
    assert res["top1"] > 20  # chance is 10 %
    for name in ("args.json", "metrics.csv", "results.json", "last.ckpt", "best.ckpt", "curves.png"):
        assert (teacher / name).is_file()


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_students_distilled_from_the_teacher(teacher, tmp_path, kind):
    out = tmp_path / kind
    run_main(deit, "--model", "deit_micro", "--teacher", "resnet8", "--teacher-ckpt", teacher / "last.ckpt",
             "--distillation-type", kind, "--epochs", "2", *SMALL, "--out", out)
    res = results(out)
    assert res["distillation_type"] == kind and res["teacher"] == "resnet8"
    # the same network, re-measured; held in bf16 in a bf16 run, a few of the 1,000 images may flip
    assert res["teacher_top1"] == pytest.approx(results(teacher)["top1"], abs=1.0)
    assert res["top1"] > 15 and res["top1_cls"] > 12 and res["top1_dist"] > 12  # chance is 10 %
    assert 15 < res["teacher_agreement"] <= 100  # chance agreement with a 10-class teacher is about 10 %
    assert res["epochs"] == 2 and res["seed"] == 0 and res["dataset"] == "cifar10-mini"
    assert res["train_img_per_s"] > 0 and res["wall_s"] > 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2
    for row in rows:  # loss = (1-λ)·CE + λ·distillation, λ = ½: the two weighted terms sum to it
        loss, ce, distill = (float(row[key]) for key in ("loss", "loss_ce", "loss_distill"))
        assert loss == pytest.approx(ce + distill, rel=1e-4) and distill > 0
    assert float(rows[-1]["teacher_agreement"]) == res["teacher_agreement"]
    # curves.png: both heads, the prediction and the agreement with the teacher over the epochs
    _, accuracy, _ = plot_curves(tmp_path / "again.png", rows, deit.CURVE_PANELS).axes
    assert [line.get_label() for line in accuracy.get_lines()] == [
        "prediction (both heads)", "class head", "distillation head", "agreement with the teacher",
        "teacher ≠ label on training views"]  # no EMA in this run: its column is left out
    assert list(accuracy.get_lines()[3].get_ydata()) == [float(row["teacher_agreement"]) for row in rows]


class ColourTeacher(torch.nn.Module):
    """Reads the class from the image: class c is an image of grey level 20·c."""

    def __init__(self, answer=None):
        super().__init__()
        self.answer, self.scale = answer, torch.nn.Parameter(torch.ones(()))

    def forward(self, images):
        classes = (images[:, 0].mean((1, 2)).float() * 255 / 20).round().long().clamp(0, 9)
        if self.answer is not None:
            classes = torch.full_like(classes, self.answer)
        return torch.nn.functional.one_hot(classes, 10).to(images.dtype) * self.scale * 10


@pytest.mark.parametrize("answer, disagreement", [(None, 0.0), (0, 90.0)])
def test_teacher_disagreement_counts_views_where_the_teacher_is_not_the_label(tmp_path, monkeypatch, answer,
                                                                               disagreement):
    labels = torch.arange(10).repeat(10)
    images = (20 * labels).to(torch.uint8)[:, None, None, None].expand(-1, 3, 32, 32).contiguous()
    data = {"train": (images, labels), "test": (images, labels), "classes": [str(c) for c in range(10)],
            "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "img_size": 32}
    monkeypatch.setattr(common.data, "load_dataset", lambda *args: data)
    monkeypatch.setattr(deit, "load_teacher", lambda *args, **kwargs: ColourTeacher(answer))
    out, stand_in = tmp_path / "run", tmp_path / "teacher.pth"
    stand_in.touch()  # the file the stand-in teacher is "loaded" from
    run_main(deit, "--model", "vit_micro", "--teacher", "resnet8", "--teacher-ckpt", stand_in, "--distillation-type",
             "hard", "--recipe", "none", "--epochs", "2", "--batch-size", "20", "--eval-every", "2", "--out", out)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [float(row["teacher_disagreement"]) for row in rows] == [disagreement] * 2
    assert [row["top1"] != "" for row in rows] == [False, True]  # --eval-every 2: the last epoch only
    res = results(out)
    assert res["teacher_disagreement"] == disagreement and res["teacher_top1"] == (100.0 if answer is None else 10.0)
    assert 0 <= res["train_top1"] <= 100


def test_teacher_from_a_project_checkpoint_ema_eval_and_weights_out(teacher, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "student"
    # no --teacher: the checkpoint knows it holds a resnet8
    run_main(deit, "--model", "deit_micro", "--teacher-ckpt", teacher / "last.ckpt", "--distillation-type", "soft",
             "--model-ema", "--model-ema-decay", "0.9", "--clip-grad", "1.0", "--grad-accum-steps", "2",
             "--epochs", "1", *SMALL, "--out", out)
    res = results(out)
    assert res["teacher"] == "resnet8" and res["ema_top1"] is not None and res["ema_top1"] > 10
    model = create_model("deit_micro", 10, 32)
    model.load_state_dict(load_file(out / "model.safetensors"))  # strict
    # a run started from those weights, with a note of what was loaded
    run_main(deit, "--model", "deit_micro", "--pretrained", out / "model.safetensors", "--epochs", "1",
             "--train-subset", "100", "--batch-size", "50", "--out", tmp_path / "pretrained")
    assert results(tmp_path / "pretrained")["pretrained"] == [
        {"file": str(out / "model.safetensors"), "loaded": len(model.state_dict()), "resampled": [], "skipped": []}]
    run_main(deit, "--eval", out / "last.ckpt", "--out", tmp_path / "eval")
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for key in ("top1", "top1_cls", "top1_dist", "teacher_top1", "teacher_agreement", "ema_top1"):
        assert evaluated[key] == res[key], key
    assert evaluated["evaluated"] == str(out / "last.ckpt") and evaluated["epochs_trained"] == 1


def test_deit_recipe_mixes_erases_and_repeats(teacher, tmp_path):
    from common.data import load_dataset
    from conftest import FakeFabric

    # training_batches of --recipe deit: Mixup and CutMix at the flags' alphas, soft targets, erasing on the device
    args = deit.parse_args(["--recipe", "deit", "--mixup", "0.3", "--cutmix", "0.7", "--reprob", "0.5",
                            "--repeated-aug", "3", "--smoothing", "0.2"])
    loader, erase, mixup = deit.training_batches(args, load_dataset("cifar10-mini", train_subset=100), FakeFabric(),
                                                 10)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.3, 0.7, 0.2)
    assert erase.probability == 0.5
    images, labels = next(iter(loader.epoch(0)))
    erased = erase(images.clone())
    mixed, targets = mixup(erased.clone(), labels)
    assert not torch.equal(erased, images) and not torch.equal(mixed, erased)
    assert targets.shape == (10, 10) and torch.allclose(targets.sum(1), torch.ones(10))
    assert (targets.max(1).values < 1).all()  # soft: mixed and smoothed, never one-hot
    # the whole recipe through deit.py's loop: the logged terms still sum to the loss
    out = tmp_path / "recipe"
    run_main(deit, "--model", "deit_micro", "--teacher", "resnet8", "--teacher-ckpt", teacher / "last.ckpt",
             "--distillation-type", "hard", "--recipe", "deit", "--repeated-aug", "3", "--epochs", "1",
             "--train-subset", "512", "--batch-size", "64", "--out", out)
    row = next(csv.DictReader(open(out / "metrics.csv")))
    assert float(row["loss"]) == pytest.approx(float(row["loss_ce"]) + float(row["loss_distill"]), rel=1e-4)
    assert 0 < float(row["teacher_disagreement"]) < 100 and results(out)["recipe"] == "deit"


def test_training_leaves_the_teacher_alone(tmp_path, monkeypatch):
    """deit.py's own loop, handed a teacher in training mode with gradients on (as a user's module may come):
    its weights and BatchNorm statistics stay those it was loaded with, and no gradient reaches it."""
    torch.manual_seed(0)
    teacher = create_model("resnet8", 10, 32).train()
    loaded = {name: value.clone() for name, value in teacher.state_dict().items()}
    monkeypatch.setattr(deit, "load_teacher", lambda *args, **kwargs: teacher)
    run_main(deit, "--model", "deit_micro", "--teacher", "resnet8", "--teacher-ckpt", __file__,
             "--distillation-type", "soft", "--epochs", "1", "--train-subset", "200", "--batch-size", "50",
             "--out", tmp_path / "run")
    # held in the run's autocast dtype (bf16 where the CPU has it): the loaded values, rounded once
    assert [name for name, value in teacher.state_dict().items()
            if not torch.equal(loaded[name].to(value.dtype), value)] == []
    assert all(p.grad is None for p in teacher.parameters())


def test_both_heads_learn_from_a_step():
    torch.manual_seed(0)
    student = create_model("deit_micro", 10, 32).train()
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    teacher_logits = torch.randn(8, 10)
    args = argparse.Namespace(distillation_type="hard", distillation_alpha=0.5, smoothing=0.1)
    terms = deit.student_loss(student(images), teacher_logits, labels, args)
    assert set(terms) == {"ce", "distill"} and all(term.item() > 0 for term in terms.values())
    terms["ce"].backward(retain_graph=True)  # the label's CE reaches the class head only
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad is None
    student.zero_grad(set_to_none=True)
    terms["distill"].backward()  # the teacher's decision reaches the distillation head only
    assert student.head_dist.weight.grad.abs().sum() > 0 and student.head.weight.grad is None


def test_resume_after_sigkill(teacher, tmp_path):
    args = ["--model", "deit_micro", "--teacher", "resnet8", "--teacher-ckpt", teacher / "last.ckpt",
            "--distillation-type", "hard", "--epochs", "3", "--train-subset", "300", "--batch-size", "30",
            "--eval-every", "3"]
    run_main(deit, *args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_when("deit.py", *args, out=killed, marker=killed / "metrics.csv")
    run_main(deit, *args, "--out", killed, "--resume")
    whole, resumed = results(tmp_path / "whole"), results(killed)
    for key in ("top1", "top1_cls", "top1_dist", "teacher_agreement"):
        assert resumed[key] == whole[key], key


def test_resume_with_the_deit_recipe_is_exact(tmp_path):
    # RandAugment runs in DataLoader workers: they must draw the same after a resume
    args = ["--model", "deit_micro", "--recipe", "deit", "--epochs", "2", "--train-subset", "256", "--batch-size",
            "64", "--val-split", "0.25"]
    run_main(deit, *args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_when("deit.py", *args, out=killed, marker=killed / "metrics.csv")
    run_main(deit, *args, "--out", killed, "--resume")
    assert metrics_without_speed(killed / "metrics.csv") == metrics_without_speed(tmp_path / "whole" / "metrics.csv")
    res = results(killed)
    assert res["best_on"] == "validation" and res["top1"] == results(tmp_path / "whole")["top1"]
    rows = list(csv.DictReader(open(killed / "metrics.csv")))
    assert rows[-1]["val_top1"] != ""
    # no column is empty in every epoch (no teacher: no agreement, on test or validation)
    assert [column for column in rows[0] if all(row[column] == "" for row in rows)] == []


# Two processes: tests/test_gpu_path.py's test_ranks_draw_their_own_augmentations runs deit.py
# under `fabric run --devices 2` with its recipe and checks what each rank trained on.


def bad(*flags):
    with pytest.raises(UserError) as error:
        run_main(deit, "--model", "deit_micro", "--epochs", "1", "--train-subset", "100", "--batch-size", "50", *flags)
    return str(error.value)


def test_bad_flags():
    with pytest.raises(UserError, match="needs --teacher"):
        deit.check_args(deit.parse_args(["--distillation-type", "soft"]))
    with pytest.raises(UserError, match="--distillation-tau must be positive"):
        deit.check_args(deit.parse_args(["--distillation-tau", "0"]))
    with pytest.raises(SystemExit):  # argparse: "invalid choice", exit status 2
        deit.parse_args(["--recipe", "fancy"])
    with pytest.raises(UserError, match="--val-split must lie in"):
        deit.check_args(deit.parse_args(["--val-split", "1"]))
    with pytest.raises(UserError, match="--teacher-ckpt missing.ckpt does not exist"):
        deit.check_args(deit.parse_args(["--distillation-type", "hard", "--teacher-ckpt", "missing.ckpt"]))
    with pytest.raises(UserError, match="^--teacher-ckpt is used only with --distillation-type soft or hard"):
        deit.check_args(deit.parse_args(["--distillation-type", "none", "--teacher-ckpt", __file__]))
    with pytest.raises(UserError, match="--randaugment garbage-xx: not a timm RandAugment policy"):
        deit.check_args(deit.parse_args(["--recipe", "deit", "--randaugment", "garbage-xx"]))


def test_odd_batch_with_mixup_is_refused(tmp_path):
    with pytest.raises(UserError, match="Mixup/CutMix need an even batch per device, got 63"):
        run_main(deit, "--model", "deit_micro", "--recipe", "deit", "--batch-size", "63", "--train-subset", "100",
                 "--epochs", "1", "--out", tmp_path / "run")


def test_bad_input(teacher, tmp_path):
    hard = ["--distillation-type", "hard", "--out", tmp_path / "x"]
    assert "does not exist" in bad("--teacher", "resnet8", "--teacher-ckpt", tmp_path / "missing.ckpt", *hard)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((teacher / "last.ckpt").read_bytes()[:2000])
    assert "cannot read" in bad("--teacher", "resnet8", "--teacher-ckpt", truncated, *hard)
    assert "do not fit" in bad("--teacher", "resnet14", "--teacher-ckpt", teacher / "last.ckpt", *hard)
    torch.save(create_model("resnet8", 100, 32).state_dict(), tmp_path / "hundred.pth")
    assert "100 classes" in bad("--teacher", "resnet8", "--teacher-ckpt", tmp_path / "hundred.pth", *hard)
    assert [path.name for path in (tmp_path / "x").iterdir()] == [".kd_run"]  # nothing but the run folder's mark


def test_randaugment_posterize_at_full_magnitude():
    # rand-m9-mstd0.5-inc1 reaches magnitude 10, where timm posterizes to 0 bits:
    # Pillow 13 refuses that, hence the pinned Pillow.
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op(Image.new("RGB", (8, 8), (200, 100, 50))).size == (8, 8)


def test_the_student_and_its_ema_copy_are_evaluated_in_one_pass():
    from common.data import load_dataset, make_loader
    from conftest import FakeFabric

    torch.manual_seed(0)
    model, other = create_model("deit_micro", 10, 32), create_model("deit_micro", 10, 32)
    loader = make_loader(load_dataset("cifar10-mini"), "test", 64, FakeFabric())
    alone = deit.evaluate(model, loader, FakeFabric())
    assert list(alone) == ["top1", "top1_cls", "top1_dist"]  # no EMA copy, no teacher: no columns for them
    assert deit.evaluate(model, None, FakeFabric()) == dict.fromkeys(alone)  # an epoch without a test
    passes = []
    epoch = loader.epoch
    loader.epoch = lambda *args: passes.append(1) or epoch(*args)
    with_ema = deit.evaluate(model, loader, FakeFabric(), ema=other)
    assert len(passes) == 1 and {key: with_ema[key] for key in alone} == alone
    assert with_ema["ema_top1"] == deit.evaluate(other, loader, FakeFabric())["top1"] != alone["top1"]  # its own


@pytest.mark.parametrize("flags, note", [
    (["--distillation-alpha", "0.9", "--distillation-tau", "3"],
     "--distillation-alpha and --distillation-tau have no effect with --distillation-type none"),
    (["--distillation-type", "hard", "--teacher", "resnet8", "--teacher-ckpt", __file__, "--distillation-tau", "3"],
     "--distillation-tau has no effect with --distillation-type hard"),  # τ softens only soft distillation
])
def test_distillation_flags_without_effect_get_a_note(flags, note, capsys):
    deit.check_args(deit.parse_args(flags))
    assert f"note: {note}\n" in capsys.readouterr().out
