"""takd.py end to end on the embedded data: chains, --compare, auto, recipes, resume, DDP and bad input."""
import contextlib
import csv
import json
import io
import re

import pytest
import torch

import takd
from common.launch import UserError
from conftest import kill_when, metrics_without_speed, png_size, results, run_main, snapshot

# --eval-every 2: the test split at the last epoch only, which is all these tests read
QUICK = ["--epochs", "2", "--train-subset", "500", "--batch-size", "50", "--lr", "0.05", "--eval-every", "2"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("takd") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        run_main(takd, "--chain", "plain6", "plain4", "plain2", "--compare", *QUICK, "--out", out)
    return out, stdout.getvalue()


def test_three_step_chain_with_compare(compared):
    out, stdout = compared
    res = results(out)
    assert res["method"] == "takd" and res["chain"] == ["plain6", "plain4", "plain2"]
    assert res["dataset"] == "cifar10-mini" and res["epochs"] == 2 and res["seed"] == 0
    assert [(s["model"], s["teacher"]) for s in res["steps"]] == [("plain6", None), ("plain4", "plain6"),
                                                                   ("plain2", "plain4")]
    assert res["student_top1"] == res["steps"][-1]["top1"]
    assert res["train_img_per_s"] > 0 and res["wall_s"] > 0 and res["ta_choice"] is None
    assert res["steps"][0]["top1"] > 15  # the teacher learned something: chance is 10 %
    # top-1 on 500 of its training images too (the subset's 500), above chance as well
    assert res["steps"][0]["train_top1"] > 15 and res["student_train_top1"] == res["steps"][-1]["train_top1"]
    # one folder per trained network, named by its lineage; the chain's student is the TAKD figure
    folders = {"plain6", "plain6_to_plain4", "plain6_to_plain4_to_plain2", "plain4", "plain2", "plain6_to_plain2"}
    assert {p.name for p in out.iterdir() if p.is_dir()} == folders
    for folder in folders:
        for name in ("last.ckpt", "metrics.csv", "curves.png", "results.json"):
            assert (out / folder / name).is_file(), (folder, name)
        assert len((out / folder / "metrics.csv").read_text().splitlines()) == 3
    networks = res["networks"]
    assert networks["plain6_to_plain4_to_plain2"]["teacher"] == "plain6_to_plain4"  # learned from that folder
    assert networks["plain6"]["teacher"] is None and networks["plain6_to_plain2"]["teacher"] == "plain6"
    compare = res["compare"]
    assert compare["nokd_top1"] == networks["plain2"]["top1"]
    assert compare["blkd_top1"] == networks["plain6_to_plain2"]["top1"]
    assert compare["takd_top1"] == networks["plain6_to_plain4_to_plain2"]["top1"] == res["student_top1"]
    assert compare["alone_top1"] == {name: networks[name]["top1"] for name in ("plain6", "plain4", "plain2")}
    assert compare["blkd_train_top1"] == networks["plain6_to_plain2"]["train_top1"]
    assert compare["alone_train_top1"] == {name: networks[name]["train_top1"] for name in compare["alone_top1"]}
    assert all(0 <= network["train_top1"] <= 100 for network in networks.values())
    # compare.csv holds the bars of compare.png: each network alone, then the student three ways
    table = [(row["network"], row["learned_from"], float(row["top1"]), float(row["train_top1"]))
             for row in csv.DictReader(open(out / "compare.csv"))]
    assert table == [*[(f"{name} alone", "labels", networks[name]["top1"], networks[name]["train_top1"])
                       for name in ("plain6", "plain4", "plain2")],
                     ("plain2 NOKD", "labels", compare["nokd_top1"], compare["nokd_train_top1"]),
                     ("plain2 BLKD", "plain6", compare["blkd_top1"], compare["blkd_train_top1"]),
                     ("plain2 TAKD", "plain6 -> plain4", compare["takd_top1"], compare["takd_train_top1"])]
    assert "NOKD" in stdout and "BLKD" in stdout and "TAKD" in stdout
    # compare.png draws the figures of compare.csv: each network alone, then the student three ways
    fig = takd.plot_comparison(out / "again.png", compare, [], res["chain"])
    bars = fig.axes[0].patches
    assert [bar.get_height() for bar in bars] == [*compare["alone_top1"].values(), compare["nokd_top1"],
                                                  compare["blkd_top1"], compare["takd_top1"]]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][-3:] == ["plain2 NOKD", "plain2 BLKD", "plain2 TAKD"]
    assert png_size(out / "compare.png") == (600, 400)
    # each network's metrics carry its loss terms: CE alone, CE and the KD term from a teacher, summing to the loss
    for folder, distilled in (("plain6", False), ("plain6_to_plain4", True)):
        rows = list(csv.DictReader(open(out / folder / "metrics.csv")))
        assert ("loss_kd" in rows[0]) == distilled, folder
        for row in rows:
            assert float(row["loss"]) == pytest.approx(float(row["loss_ce"]) + float(row.get("loss_kd", 0)), rel=1e-5)


def test_choose_assistant_takes_the_candidate_nearest_the_midpoint():
    candidates = {"plain4": 60.0, "plain6": 70.0, "plain8": 78.0}
    choose = lambda teacher, student: takd.choose_assistant(candidates, teacher, student, num_classes=10)
    assert choose(80.0, 60.0) == {"candidates": candidates, "excluded": {}, "teacher_top1": 80.0,
                                  "student_alone_top1": 60.0, "midpoint": 70.0, "scored_on": "validation",
                                  "chosen": "plain6"}
    assert [choose(90.0, 60.0)[key] for key in ("chosen", "midpoint")] == ["plain8", 75.0]  # 3 from 78
    assert [choose(64.0, 50.0)[key] for key in ("chosen", "midpoint")] == ["plain4", 57.0]


def test_a_candidate_near_chance_is_left_out():
    # midpoint 12.5, and plain4 sits there, but at 2 points above chance (10 %) it learned nothing
    choose = lambda *args: [takd.choose_assistant(*args)[key] for key in ("chosen", "excluded")]
    assert choose({"plain4": 12.0, "plain6": 40.0}, 21.0, 4.0, 10) == ["plain6", {"plain4": 12.0}]
    assert choose({"plain4": 12.5, "plain6": 40.0}, 21.0, 4.0, 10) == ["plain4", {}]
    assert choose({"plain4": 3.5, "plain6": 40.0}, 3.0, 4.0, 100) == ["plain4", {}]  # chance 1 %
    with pytest.raises(UserError, match=r"no --ta-candidates network is more than 2 points above chance \(10 %\)"):
        takd.choose_assistant({"plain4": 10.0, "plain6": 11.5}, 60.0, 40.0, 10)


def validation_top1(monkeypatch, top1s):
    """Networks trained alone, in the sub-folders named in `top1s`, score these on the
    validation split: at chance, say, as plain4 did after dying at lr 0.1."""
    train_network = takd.train_network

    def scored(lineage, *rest):
        model, result = train_network(lineage, *rest)
        result["val_top1"] = top1s.get("_to_".join(lineage), result["val_top1"])
        return model, result
    monkeypatch.setattr(takd, "train_network", scored)


def test_auto_end_to_end(tmp_path, monkeypatch, capsys):
    from matplotlib.colors import to_rgba

    out = tmp_path / "auto"
    validation_top1(monkeypatch, {"plain4": 12.0})  # 2 points above chance: left out, whatever the midpoint
    run_main(takd, "--chain", "plain6", "auto", "plain2", "--ta-candidates", "plain4", "plain2", *QUICK,
             "--val-split", "0.2", "--out", out)
    res = results(out)
    choice, networks = res["ta_choice"], res["networks"]
    assert set(choice["candidates"]) == {"plain4", "plain2"} and choice["position"] == 1
    assert choice["excluded"] == {"plain4": 12.0} and choice["chosen"] == "plain2"
    assert "left out, within 2 points of chance: {'plain4': 12.0}" in capsys.readouterr().out
    # scored on the 100 held-out training images, never on the test split
    assert choice["scored_on"] == "validation" and res["best_on"] == "validation"
    assert choice["teacher_top1"] == networks["plain6"]["val_top1"]
    assert choice["student_alone_top1"] == choice["candidates"]["plain2"] == networks["plain2"]["val_top1"]
    assert choice["midpoint"] == (choice["teacher_top1"] + choice["student_alone_top1"]) / 2
    assert networks["plain2"]["val_top1"] != networks["plain2"]["top1"]
    rule = takd.choose_assistant(choice["candidates"], choice["teacher_top1"], choice["student_alone_top1"], 10)
    assert choice == rule | {"position": 1, "candidates_train_top1": choice["candidates_train_top1"]}
    assert choice["candidates_train_top1"] == {name: networks[name]["train_top1"] for name in choice["candidates"]}
    assert res["chain"] == ["plain6", choice["chosen"], "plain2"] and res["requested_chain"][1] == "auto"
    # the student alone served as neighbour and candidate: trained once, in one folder
    chosen = choice["chosen"]
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"plain6", "plain4", "plain2", f"plain6_to_{chosen}",
                                                             f"plain6_to_{chosen}_to_plain2"}
    # compare.png: the candidates' validation accuracies (chosen green, left out red) against the midpoint
    fig = takd.plot_comparison(out / "again.png", None, [choice], res["chain"])
    ax = fig.axes[0]
    assert [bar.get_height() for bar in ax.patches] == list(choice["candidates"].values())
    assert [bar.get_facecolor() for bar in ax.patches] == [to_rgba("tab:red"), to_rgba("tab:green")]  # out, chosen
    midpoint = (choice["teacher_top1"] + choice["student_alone_top1"]) / 2
    assert [line.get_ydata()[0] for line in ax.get_lines()] == pytest.approx(
        [choice["teacher_top1"], midpoint, choice["student_alone_top1"]])


def test_no_candidate_above_chance_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys):
    # every network trained scores 10 % (chance) on validation: the rule needs no training to show
    monkeypatch.setattr(takd, "train_network",
                        lambda *args: (None, {"val_top1": 10.0, "train_top1": 10.0, "loaded": False}))
    args = takd.parse_args(["--chain", "plain6", "auto", "plain2", "--ta-candidates", "plain4", "plain8",
                            "--val-split", "0.2", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_:
        takd.exit_on_user_error(takd.main, args)  # as `python takd.py` runs
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "no --ta-candidates network is more than 2 points above chance (10 %)" in err and "plain8" in err


def test_eval_pretrained_and_weights_out(tmp_path, compared):
    from safetensors.torch import load_file

    from common.models import create_model

    out, _ = compared
    res = results(out)
    model = create_model("plain4", 10, 32)
    model.load_state_dict(load_file(out / "plain6_to_plain4" / "model.safetensors"))  # strict
    run_main(takd, "--eval", out / "plain6_to_plain4" / "last.ckpt", "--out", tmp_path / "eval")
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["model"] == "plain4" and evaluated["top1"] == res["networks"]["plain6_to_plain4"]["top1"]
    # the student starts from a weights file in every lineage
    run_main(takd, "--chain", "plain6", "plain2", "--teacher-ckpt", out / "plain6" / "last.ckpt", "--pretrained",
             out / "plain2" / "model.safetensors", "--epochs", "1", "--train-subset", "100", "--batch-size", "50",
             "--out", tmp_path / "pretrained")
    report = results(tmp_path / "pretrained")["networks"]["plain6_to_plain2"]["pretrained"]
    assert report["file"] == str(out / "plain2" / "model.safetensors") and report["skipped"] == []


def test_reuse_a_teacher_trained_elsewhere(tmp_path, compared):
    out, _ = compared
    teacher = out / "plain6" / "last.ckpt"
    run_main(takd, "--chain", "plain6", "plain2", "--teacher-ckpt", teacher, "--epochs", "1", "--train-subset",
             "200", "--batch-size", "50", "--out", tmp_path / "reuse")
    res = results(tmp_path / "reuse")
    # the same weights, evaluated: held in bf16 as a frozen teacher, they may flip an image or two of the
    # 1,000 (with another thread count, say) against the autocast evaluation at the end of training
    assert res["steps"][0]["top1"] == pytest.approx(results(out)["networks"]["plain6"]["top1"], abs=0.25)
    assert sorted(p.name for p in (tmp_path / "reuse").iterdir() if p.is_dir()) == ["plain6_to_plain2"]


def test_each_family_its_recipe_and_the_test_split_every_2nd_epoch(tmp_path):
    """A chain may mix the families: the ResNet learns at lr 0.1, ÷10 at 50 % and 75 %
    of the epochs after a warm-up, the plain CNN at the authors' constant 0.01 without
    weight decay, both scaled to the batch. The test split is read at epochs 2 and 3."""
    out = tmp_path / "mixed"
    run_main(takd, "--chain", "resnet8", "plain2", "--epochs", "3", "--eval-every", "2", "--train-subset", "100",
             "--batch-size", "50", "--out", out)
    networks = results(out)["networks"]
    for folder, recipe, rates in (("resnet8", {"lr": 0.1, "weight_decay": 1e-4, "schedule": "step",
                                               "warmup_epochs": 1.0}, [0.1, 0.01, 0.001]),
                                  ("resnet8_to_plain2", {"lr": 0.01, "weight_decay": 0.0, "schedule": "constant",
                                                         "warmup_epochs": 0.0}, [0.01] * 3)):
        assert {key: networks[folder][key] for key in recipe} == recipe, folder
        rows = list(csv.DictReader(open(out / folder / "metrics.csv")))
        assert [float(row["lr"]) for row in rows] == pytest.approx([rate * 50 / 128 for rate in rates])
        best = torch.load(out / folder / "best.ckpt", weights_only=False)
        assert best["optimizer"]["param_groups"][0]["weight_decay"] == recipe["weight_decay"]
        # epoch 1 left the test columns empty; best.ckpt is the better of epochs 2 and 3 (the first on a tie)
        assert [(row["top1"] != "", row["top5"] != "") for row in rows] == [(False, False), (True, True), (True, True)]
        tested = {int(row["epoch"]): float(row["top1"]) for row in rows if row["top1"]}
        assert best["epoch"] == max(tested, key=tested.get) and networks[folder]["top1"] == tested[3]
        assert 0 <= networks[folder]["train_top1"] <= 100
    # a flag given sets its value for every network; those not given stay each family's
    args = takd.parse_args(["--lr", "0.05", "--weight-decay", "0", "--schedule", "step", "--warmup-epochs", "0"])
    assert takd.recipe_of("plain4", args) == takd.recipe_of("resnet8", args) == {
        "lr": 0.05, "weight_decay": 0.0, "schedule": "step", "warmup_epochs": 0.0}
    assert takd.recipe_of("resnet8", takd.parse_args(["--lr", "0.05"]))["weight_decay"] == 1e-4


def test_a_chain_of_one_trains_a_teacher_alone(tmp_path):
    run_main(takd, "--chain", "plain4", "--epochs", "1", "--train-subset", "100", "--batch-size", "50",
             "--out", tmp_path / "teacher")
    res = results(tmp_path / "teacher")
    assert [step["model"] for step in res["steps"]] == ["plain4"] and res["steps"][0]["teacher"] is None
    assert (tmp_path / "teacher" / "plain4" / "last.ckpt").is_file()  # what a later chain loads as its teacher
    assert res["student_top1"] == res["networks"]["plain4"]["top1"]


def test_resume_after_sigkill_in_the_second_step(tmp_path, capsys):
    args = ["--chain", "plain4", "plain10", "plain2", "--epochs", "3", "--train-subset", "400", "--batch-size", "50",
            "--lr", "0.05", "--eval-every", "2"]  # the test split skipped at epoch 1, resumed alike
    run_main(takd, *args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_when("takd.py", *args, out=killed, marker=killed / "plain4_to_plain10" / "metrics.csv")
    first = (killed / "plain4" / "last.ckpt").read_bytes()
    assert torch.load(killed / "plain4_to_plain10" / "last.ckpt", weights_only=False)["epoch"] < 3
    capsys.readouterr()
    run_main(takd, *args, "--out", killed, "--resume")
    stdout = capsys.readouterr().out
    assert "plain4: trained already" in stdout and "plain4_to_plain10: continuing at epoch" in stdout
    assert (killed / "plain4" / "last.ckpt").read_bytes() == first  # the finished step was not retrained
    whole, resumed = results(tmp_path / "whole"), results(killed)
    figures = lambda run: [(step["top1"], step["train_top1"]) for step in run["steps"]]
    assert figures(resumed) == figures(whole)
    # the run's time counts the network finished before the kill (and reused), not only this session's
    networks = resumed["networks"]
    assert resumed["wall_s"] == pytest.approx(sum(networks[name]["wall_s"] for name in networks))
    assert networks["plain4"]["wall_s"] > 0 and resumed["wall_s"] > networks["plain4"]["wall_s"]
    for folder in ("plain4", "plain4_to_plain10", "plain4_to_plain10_to_plain2"):
        assert metrics_without_speed(killed / folder / "metrics.csv") == \
            metrics_without_speed(tmp_path / "whole" / folder / "metrics.csv"), folder


# --- bad input: one line, non-zero exit, nothing overwritten -------------------


@pytest.mark.parametrize("flags, message", [
    (["--chain", "plain4", "--compare"], "--compare needs a teacher and a student"),
    (["--chain", "plain6", "auto", "plain2"], "--ta-candidates names no networks"),
    (["--chain", "plain6", "auto", "plain2", "--ta-candidates", "plain4"], "give --val-split"),
    (["--chain", "plain8", "auto", "auto", "plain2", "--ta-candidates", "plain4"], "two `auto`s in a row"),
    (["--chain", "auto", "plain2", "--ta-candidates", "plain4"], "cannot be `auto`"),
    (["--distillation-alpha", "1.5"], "--distillation-alpha must lie in [0, 1]"),
    (["--distillation-alpha", "-0.1"], "--distillation-alpha must lie in [0, 1]"),
    (["--distillation-tau", "0"], "--distillation-tau must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--eval-every", "0"], "--eval-every must be positive"),
    (["--weight-decay", "-1"], "--weight-decay must not be negative"),  # None (the family's) is no error
    (["--resume"], "--resume needs --out"),
    (["--pretrained", "/nonexistent/plain2.pth"], "--pretrained /nonexistent/plain2.pth does not exist"),  # not late
    (["--teacher-ckpt", "/"], "--teacher-ckpt / is a folder, not a file"),
    # the student's sub-folder would be a teacher's or a candidate's too: pretrained or not?
    (["--chain", "plain4", "plain4", "--pretrained", __file__], "--pretrained starts the student plain4, which cannot"),
    (["--chain", "plain6", "auto", "plain2", "--ta-candidates", "plain2", "--val-split", "0.1", "--pretrained",
      __file__], "cannot also be a teacher, TA or candidate"),
])
def test_bad_flags(flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        takd.check_args(takd.parse_args(["--chain", "plain4", "plain2", *flags]))


@pytest.mark.parametrize("flags, message", [
    (["--chain", "plain4", "plain_typo"], "unknown model 'plain_typo'"),
    (["--teacher-ckpt", "/nonexistent/teacher.ckpt"], "does not exist"),
])
def test_bad_input(tmp_path, flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run_main(takd, "--chain", "plain4", "plain2", "--train-subset", "50", "--batch-size", "50", *flags,
                 "--out", tmp_path / "run")


def test_teacher_checkpoint_of_another_network_is_refused(tmp_path, compared):
    out, _ = compared
    with pytest.raises(UserError, match="do not fit"):
        run_main(takd, "--chain", "plain8", "plain2", "--teacher-ckpt", out / "plain6" / "last.ckpt",
                 "--train-subset", "50", "--batch-size", "50", "--out", tmp_path / "run")


def test_existing_run_folder_is_refused(compared):
    out, _ = compared
    before = snapshot(out)
    with pytest.raises(UserError, match="exists and is not empty"):
        run_main(takd, "--chain", "plain6", "plain2", *QUICK, "--out", out)
    assert snapshot(out) == before


def test_constant_schedule_of_the_authors_plain_cnns():
    args = takd.parse_args(["--epochs", "15"])
    recipe = takd.recipe_of("plain4", args)
    assert [takd.learning_rate(recipe, args, epoch, 0, 10) for epoch in range(15)] == pytest.approx([0.01] * 15)


def test_learning_rate_schedule_of_the_resnets():
    args = takd.parse_args(["--epochs", "15", "--batch-size", "256"])
    recipe = takd.recipe_of("resnet20", args)
    rates = [takd.learning_rate(recipe, args, epoch, 9, 10) for epoch in range(15)]
    assert rates[0] == pytest.approx(0.2)  # 0.1 at batch 128, scaled; the last step of the warm-up
    assert takd.learning_rate(recipe, args, 0, 4, 10) == pytest.approx(0.1)  # half way through the warm-up
    # ÷10 at epoch 7 = int(15/2) and 11 = int(15*3/4), counted from 0, as the authors' code
    assert rates[6] == pytest.approx(0.2) and rates[7] == pytest.approx(0.02) and rates[11] == pytest.approx(0.002)
    args = takd.parse_args(["--epochs", "1"])  # no decay inside a one-epoch run
    assert takd.learning_rate(recipe, args, 0, 9, 10) == pytest.approx(0.1)


def test_distillation_flags_on_a_chain_of_one_network_get_a_note(capsys):
    takd.check_args(takd.parse_args(["--chain", "plain2", "--distillation-alpha", "0.3"]))
    assert "note: --distillation-alpha has no effect on a chain of one network" in capsys.readouterr().out


def test_candidates_without_auto_get_a_note(capsys):
    takd.check_args(takd.parse_args(["--chain", "plain6", "plain2", "--ta-candidates", "plain4"]))
    assert capsys.readouterr().out == "note: --ta-candidates has no effect without `auto` in --chain\n"
    takd.check_args(takd.parse_args(["--chain", "plain6", "plain2"]))  # not given: no note
    assert capsys.readouterr().out == ""
