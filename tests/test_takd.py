"""takd.py end to end on the embedded data: chains, --compare, auto, resume, DDP and bad input."""
import contextlib
import csv
import io
import re

import pytest
import torch

import takd
from common.run import UserError
from conftest import kill_when, metrics_without_speed, png_size, results, run_main, snapshot

QUICK = ["--epochs", "2", "--train-subset", "500", "--batch-size", "50", "--lr", "0.05"]


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
    table = (out / "compare.csv").read_text().splitlines()
    assert table[0] == "network,alone_top1,in_chain_top1,learned_from" and len(table) == 1 + 3 + 3
    assert "NOKD" in stdout and "BLKD" in stdout and "TAKD" in stdout
    # compare.png draws the figures of compare.csv: each network alone, then the student three ways
    fig = takd.plot_comparison(out / "again.png", compare, [], res["chain"])
    bars = fig.axes[0].patches
    assert [bar.get_height() for bar in bars] == [*compare["alone_top1"].values(), compare["nokd_top1"],
                                                  compare["blkd_top1"], compare["takd_top1"]]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][-3:] == ["plain2 NOKD", "plain2 BLKD", "plain2 TAKD"]
    assert png_size(out / "compare.png") == (600, 400)
    # each network's curves carry its distillation term: zero alone, positive from a teacher
    for folder, distilled in (("plain6", False), ("plain6_to_plain4", True)):
        rows = list(csv.DictReader(open(out / folder / "metrics.csv")))
        assert all((float(row["loss_distill"]) > 0) == distilled for row in rows), folder


def test_choose_assistant_takes_the_candidate_nearest_the_midpoint():
    candidates = {"plain4": 60.0, "plain6": 70.0, "plain8": 78.0}
    assert takd.choose_assistant(candidates, teacher_top1=80.0, student_top1=60.0) == "plain6"  # midpoint 70
    assert takd.choose_assistant(candidates, teacher_top1=90.0, student_top1=60.0) == "plain8"  # 75: 3 from 78
    assert takd.choose_assistant(candidates, teacher_top1=64.0, student_top1=50.0) == "plain4"  # 57


def test_auto_end_to_end(tmp_path):
    out = tmp_path / "auto"
    run_main(takd, "--chain", "plain6", "auto", "plain2", "--ta-candidates", "plain4", "plain2", *QUICK,
             "--val-split", "0.2", "--out", out)
    res = results(out)
    choice = res["ta_choice"]
    assert set(choice["candidates"]) == {"plain4", "plain2"} and choice["position"] == 1
    # scored on the 100 held-out training images, never on the test split
    assert choice["scored_on"] == "validation" and res["best_on"] == "validation"
    assert choice["teacher_top1"] == res["networks"]["plain6"]["val_top1"]
    assert choice["student_alone_top1"] == choice["candidates"]["plain2"] == res["networks"]["plain2"]["val_top1"]
    assert res["networks"]["plain2"]["val_top1"] != res["networks"]["plain2"]["top1"]
    assert choice["chosen"] == takd.choose_assistant(choice["candidates"], choice["teacher_top1"],
                                                     choice["student_alone_top1"])
    assert res["chain"] == ["plain6", choice["chosen"], "plain2"] and res["requested_chain"][1] == "auto"
    # the student alone served as neighbour and candidate: trained once, in one folder
    chosen = choice["chosen"]
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"plain6", "plain4", "plain2", f"plain6_to_{chosen}",
                                                             f"plain6_to_{chosen}_to_plain2"}
    # compare.png: the candidates' validation accuracies, the chosen one green, against the midpoint
    fig = takd.plot_comparison(out / "again.png", None, [choice], res["chain"])
    ax = fig.axes[0]
    assert [bar.get_height() for bar in ax.patches] == list(choice["candidates"].values())
    midpoint = (choice["teacher_top1"] + choice["student_alone_top1"]) / 2
    assert [line.get_ydata()[0] for line in ax.get_lines()] == pytest.approx(
        [choice["teacher_top1"], midpoint, choice["student_alone_top1"]])
    rows = list(csv.DictReader(open(out / "ta_choice.csv")))
    assert [row["candidate"] for row in rows if row["chosen"] == "True"] == [choice["chosen"]]


def test_eval_pretrained_and_weights_out(tmp_path, compared):
    from safetensors.torch import load_file

    from common.models import create_model

    out, _ = compared
    res = results(out)
    model = create_model("plain4", 10, 32)
    model.load_state_dict(load_file(out / "plain6_to_plain4" / "model.safetensors"))  # strict
    run_main(takd, "--eval", out / "plain6_to_plain4" / "last.ckpt", "--out", tmp_path / "eval")
    evaluated = results(tmp_path / "eval")
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


def test_a_chain_of_one_trains_a_teacher_alone(tmp_path):
    run_main(takd, "--chain", "plain4", "--epochs", "1", "--train-subset", "100", "--batch-size", "50",
             "--out", tmp_path / "teacher")
    res = results(tmp_path / "teacher")
    assert [step["model"] for step in res["steps"]] == ["plain4"] and res["steps"][0]["teacher"] is None
    assert (tmp_path / "teacher" / "plain4" / "last.ckpt").is_file()  # what a later chain loads as its teacher
    assert res["student_top1"] == res["networks"]["plain4"]["top1"]


def test_resume_after_sigkill_in_the_second_step(tmp_path, capsys):
    args = ["--chain", "plain4", "plain10", "plain2", "--epochs", "3", "--train-subset", "400", "--batch-size", "50",
            "--lr", "0.05"]
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
    assert [s["top1"] for s in resumed["steps"]] == [s["top1"] for s in whole["steps"]]
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
    (["--resume"], "--resume needs --out"),
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
        run_main(takd, "--chain", "plain4", "plain2", "--train-subset", "50", *flags, "--out", tmp_path / "run")


def test_teacher_checkpoint_of_another_network_is_refused(tmp_path, compared):
    out, _ = compared
    with pytest.raises(UserError, match="do not fit"):
        run_main(takd, "--chain", "plain8", "plain2", "--teacher-ckpt", out / "plain6" / "last.ckpt",
                 "--train-subset", "50", "--out", tmp_path / "run")


def test_existing_run_folder_is_refused(compared):
    out, _ = compared
    before = snapshot(out)
    with pytest.raises(UserError, match="exists and is not empty"):
        run_main(takd, "--chain", "plain6", "plain2", *QUICK, "--out", out)
    assert snapshot(out) == before


def test_constant_schedule_of_the_papers_plain_cnns():
    args = takd.parse_args(["--epochs", "15", "--schedule", "constant", "--warmup-epochs", "0"])
    assert [takd.learning_rate(args, epoch, 3, 10) for epoch in range(15)] == pytest.approx([0.1] * 15)


def test_learning_rate_schedule():
    args = takd.parse_args(["--epochs", "15", "--batch-size", "256", "--warmup-epochs", "1"])
    rates = [takd.learning_rate(args, epoch, 9, 10) for epoch in range(15)]
    assert rates[0] == pytest.approx(0.2)  # 0.1 at batch 128, scaled; the last step of the warm-up
    assert takd.learning_rate(args, 0, 4, 10) == pytest.approx(0.1)  # half way through the warm-up
    assert rates[7] == pytest.approx(0.2) and rates[8] == pytest.approx(0.02) and rates[12] == pytest.approx(0.002)
