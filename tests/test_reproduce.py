"""reproduce.py: the paired verdicts and the minimum detectable effect on
hand-computed numbers, every table end to end on a few hundred training images (--quick),
the data flags reaching every run, and the reuse and resumption of its runs."""
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import deit
import dml
import ktg_ensemble
import reproduce
import takd
from common.launch import UserError
from conftest import ROOT, free_port, png_size


def make_table(table, out, *extra):
    reproduce.main(reproduce.parse_args([table, "--quick", "--out", str(out), *extra]))
    return json.loads((out / "table.json").read_text())


def row(table, method, metric):
    return next(r for r in table["rows"] if r["method"] == method and r["metric"] == metric)


# --- verdicts ------------------------------------------------------------------

def differences(*values):
    """A claim whose per-seed differences are `values` (better = values, worse = 0)."""
    return reproduce.claim("A > B", list(values), [0.0] * len(values))


def test_a_consistent_positive_difference_holds():
    result = differences(2.0, 2.1, 1.9)
    # mean 2, sd 0.1, t(0.975, 2) = 4.303: 2 ± 4.303 · 0.1 / √3 = 2 ± 0.248
    assert result["verdict"] == "holds" and result["n"] == 3 and result["mean"] == pytest.approx(2.0)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((1.752, 2.248), abs=1e-3)
    assert result["p"] < 0.01 and result["differences"] == [2.0, 2.1, 1.9]


def test_a_spread_interval_that_contains_zero_is_inconclusive():
    result = differences(1, 2, 3)
    # mean 2, sd 1: half-width 4.303 / √3 = 2.484; t = 2 / (1 / √3) = 3.464, two-sided p(df 2) = 0.074
    assert result["verdict"] == "inconclusive" and result["mean"] == pytest.approx(2.0)
    assert round(result["ci_low"], 2) == -0.48 and round(result["ci_high"], 2) == 4.48
    assert result["p"] == pytest.approx(0.074, abs=5e-4)


def test_a_consistent_negative_difference_is_contradicted():
    result = differences(-2.0, -2.1, -1.9)
    assert result["verdict"] == "contradicted"
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((-2.248, -1.752), abs=1e-3)


def test_one_seed_and_no_spread():
    one = differences(5.0)
    assert one["verdict"] == "inconclusive" and one["n"] == 1
    assert one["ci_low"] is None and one["ci_high"] is None and one["p"] is None and one["mde"] is None
    # every seed the same difference: the interval collapses to it (computed from floats that
    # differ in their last bits, e.g. 41.1 − 40.0 and 42.1 − 41.0)
    same = reproduce.claim("A > B", [41.1, 42.1, 43.1], [40.0, 41.0, 42.0])
    assert same["verdict"] == "holds" and same["ci_low"] == same["ci_high"] == pytest.approx(1.1)
    assert same["p"] == 0.0 and same["mde"] == 0.0
    zero = differences(0.0, 0.0)
    assert zero["verdict"] == "inconclusive" and zero["p"] == 1.0


def test_the_minimum_detectable_effect_has_80_percent_power():
    """sd 1, n 3: simulate the paired t-test at the computed effect; it rejects in 80 % of the samples."""
    effect = reproduce.minimum_detectable_effect(1.0, 3)
    assert 3.0 < effect < 3.5  # about 3.26 standard deviations with 2 degrees of freedom
    samples = np.random.default_rng(0).normal(effect, 1.0, size=(200_000, 3))
    t = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(3))
    assert np.mean(np.abs(t) > 4.302653) == pytest.approx(0.80, abs=0.005)
    assert reproduce.minimum_detectable_effect(2.0, 3) == pytest.approx(2 * effect)  # in units of the spread
    two = reproduce.minimum_detectable_effect(1.0, 2)  # 1 degree of freedom: deep in the noncentral t's tails
    samples = np.random.default_rng(1).normal(two, 1.0, size=(200_000, 2))
    t = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(2))
    assert np.mean(np.abs(t) > 12.7062) == pytest.approx(0.80, abs=0.005)
    assert differences(1, 2, 3)["mde"] == pytest.approx(effect, abs=1e-3)


# --- tables --------------------------------------------------------------------

def image_folder(root, classes=2, train=250, val=10):
    """A tiny ImageFolder: `classes` colours, 32×32 PNGs with noise, in root/train/<class> and root/val/<class>."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (32, 32, 3)) + np.array([150 if k == c else 40 for k in range(3)])
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """Each table made once with --quick (2 seeds, 1 epoch, 100 training images) on a tiny
    ImageFolder at 16 px (500 images, 20 test images), where they also show the data flags
    reaching every run (cifar10-mini's 1,000 test images would take most of the time)."""
    root = tmp_path_factory.mktemp("tables")
    folder = ["--dataset", "imagefolder", "--data-dir", str(image_folder(root / "data")), "--img-size", "16"]
    return {name: (make_table(name, root / name, *folder), root / name) for name in reproduce.TABLES}


@pytest.mark.parametrize("name", list(reproduce.TABLES))
def test_quick_table_writes_rows_claims_and_pictures(tables, name):
    table, out = tables[name]
    assert table["table"] == name and table["seeds"] == [0, 1] and table["quick"]
    for r in table["rows"]:
        assert r["mean"] == pytest.approx(statistics.mean(r["values"]), abs=1e-3)
        if len(r["values"]) > 1:
            assert r["std"] == pytest.approx(statistics.stdev(r["values"]), abs=1e-3)
        else:  # a teacher trained once: no spread, rather than a spread of 0
            assert r["std"] is None
    seeded = [r for r in table["rows"] if "trained once" not in r["method"] and "search" not in r["method"]]
    assert seeded and all(len(r["values"]) == 2 for r in seeded)
    assert (table["dataset"], table["img_size"]) == ("imagefolder", 16)
    assert table["claims"] and all(c["verdict"] in ("holds", "contradicted", "inconclusive") for c in table["claims"])
    for c in (c for c in table["claims"] if c["mde"] is not None):  # the paired claims
        assert c["n"] == 2 and c["mean"] == pytest.approx(statistics.mean(c["differences"]), abs=1e-3)
        assert c["ci_low"] <= c["mean"] <= c["ci_high"] and 0 <= c["p"] <= 1
        assert c["verdict"] == ("holds" if c["ci_low"] > 0 else "contradicted" if c["ci_high"] < 0 else "inconclusive")
    assert table["minimum_detectable_effect"] == pytest.approx(statistics.median(
        c["mde"] for c in table["claims"] if c["mde"] is not None and c["unit"] == "points"), abs=1e-3)
    markdown = (out / "table.md").read_text()
    assert all(r["method"] in markdown for r in table["rows"]) and all(c["claim"] in markdown for c in table["claims"])
    assert "Minimum detectable effect" in markdown
    assert png_size(out / "table.png")[0] > 0
    axes = reproduce.plot_table(out / "again.png", table).axes[0]
    assert axes.get_xlim()[0] == 0 and any(list(line.get_xdata()) == [10, 10] and line.get_linestyle() == ":"
                                           for line in axes.lines)  # chance, by default CIFAR-10's
    assert table["runs_wall_s"] > 0


def test_dml_claims_follow_from_the_rows(tables):
    table, out = tables["dml"]

    def students(method):
        return statistics.mean(row(table, method, f"top-1 student {k} (vit_micro)")["mean"] for k in (1, 2))
    claim = table["claims"][0]
    assert claim["claim"].startswith("DML (ViT) > Independent")
    assert claim["mean"] == pytest.approx(students("DML (ViT), equal") - students("Independent (ViT), equal"),
                                          abs=2e-3)
    assert (out / "landscape.png").is_file()
    rises = row(table, "DML (ViT), equal", "landscape: loss rise at the largest σ")["values"]
    assert len(rises) == 2 and all(rise > 0 for rise in rises)  # noise on the weights raises the loss


def test_takd_table_compares_the_automatic_choice_with_hindsight(tables):
    table, out = tables["takd"]
    sweep = [row(table, f"TAKD via {c}", "top-1")["values"] for c in ("plain4", "plain6", "plain8")]
    assert row(table, "TAKD, best assistant in hindsight (chosen on test)", "top-1")["values"] == \
        [max(values) for values in zip(*sweep)]
    choice = next(c for c in table["claims"] if "chosen" in c)
    assert len(choice["chosen"]) == 2 and set(choice["chosen"]) <= {"plain4", "plain6", "plain8"}
    automatic = row(table, "TAKD, assistant chosen automatically", "top-1")["values"]
    hindsight = row(table, "TAKD, best assistant in hindsight (chosen on test)", "top-1")["values"]
    assert choice["differences"] == pytest.approx([a - h for a, h in zip(automatic, hindsight)], abs=1e-3)
    assert choice["verdict"] == ("holds" if all(d >= 0 for d in choice["differences"]) else "contradicted")
    # the teacher was trained once and loaded by every seed's runs
    teacher = out / "runs" / "teacher" / "plain10" / "last.ckpt"
    args = json.loads((out / "runs" / "auto" / "seed1" / "args.json").read_text())
    assert teacher.is_file() and args["teacher_ckpt"] == str(teacher)
    for seed, chosen in enumerate(choice["chosen"]):
        # the chain through the chosen assistant is the automatic run's, not trained again
        assert not (out / "runs" / f"via-{chosen}" / f"seed{seed}").exists()
        assert row(table, f"TAKD via {chosen}", "top-1")["values"][seed] == automatic[seed]
        # Fig. 2: plain2 learns from each candidate as the automatic run trained it alone
        for c in ("plain4", "plain6", "plain8"):
            args = json.loads((out / "runs" / f"from-{c}-alone" / f"seed{seed}" / "args.json").read_text())
            assert args["teacher_ckpt"] == str(out / "runs" / "auto" / f"seed{seed}" / c / "last.ckpt")
            assert args["chain"] == [c, "plain2"]
    assert any(c["claim"].startswith("Fig. 2") for c in table["claims"])


def test_deit_and_ktg_use_one_teacher_and_one_search(tables):
    table, out = tables["deit"]
    for method in ("soft (deit_micro)", "hard (deit_micro)"):
        args = json.loads((out / "runs" / reproduce.slug(method) / "seed0" / "args.json").read_text())
        assert args["teacher_ckpt"] == str(out / "runs" / "teacher" / "resnet20" / "last.ckpt")
        assert (args["recipe"], args["repeated_aug"]) == ("deit", 1)
    teacher = json.loads((out / "runs" / "teacher" / "args.json").read_text())
    assert teacher["train_subset"] == args["train_subset"]  # the teacher learns from the students' images
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == \
        ["hard-deit-micro", "none-vit-micro", "soft-deit-micro", "teacher"]
    table, out = tables["ktg"]
    graph = json.loads((out / "runs" / "search" / "best_graph.json").read_text())
    search = json.loads((out / "runs" / "search" / "args.json").read_text())
    assert search["search"] == int(reproduce.role("ktg", "search", True)[1])
    for seed in (0, 1):
        trained = json.loads((out / "runs" / "ktg-searched-graph" / f"seed{seed}" / "results.json").read_text())
        assert trained["graph"] == graph and trained["seed"] == seed


def test_a_rerun_reuses_finished_runs_and_resumes_a_killed_one(tables, tmp_path, monkeypatch):
    """Runs with results.json are not trained again; one without it (killed after its
    last checkpoint) is resumed, and the table comes out the same."""
    table, out = tables["dml"]
    killed = out / "runs" / "dml-vit-equal" / "seed1"
    (killed / "results.json").unlink()
    calls = []
    for script in (dml, deit, takd, ktg_ensemble):
        original = script.main
        monkeypatch.setattr(script, "main", lambda args, original=original: calls.append(args) or original(args))
    again = make_table("dml", out, "--dataset", "imagefolder", "--data-dir", table["data_dir"], "--img-size", "16")
    assert [(args.out, args.resume) for args in calls] == [(str(killed), True)]
    assert again["rows"] == table["rows"] and again["claims"] == table["claims"]


def test_the_data_flags_reach_every_run_and_a_rerun_on_other_data_is_refused(tables, tmp_path):
    table, out = tables["takd"]
    data = table["data_dir"]
    assert (table["dataset"], table["img_size"]) == ("imagefolder", 16)
    runs = sorted(lock.with_suffix("") for lock in (out / "runs").rglob("*.lock") if lock.with_suffix("").is_dir())
    # the teacher; for each seed the automatic choice, the two assistants it did not choose, plain2 from each alone
    assert len(runs) == 1 + 2 * 6
    for run in runs:
        args = json.loads((run / "args.json").read_text())
        assert (args["dataset"], args["data_dir"], args["img_size"]) == ("imagefolder", data, 16), run
    # the same folder on other data, cifar10-mini or another data folder: its runs are not reused
    with pytest.raises(UserError, match="trained with other dataset"):
        make_table("takd", out)
    moved = image_folder(tmp_path / "moved")
    with pytest.raises(UserError, match="trained with other data_dir"):
        make_table("takd", out, "--dataset", "imagefolder", "--data-dir", str(moved), "--img-size", "16")


def test_a_dataset_gets_its_own_default_folder(monkeypatch, tmp_path):
    class Asked(Exception):
        """Stops main where the table would start, with where and with what flags."""

    def table(flags, seeds, runs, quick):
        raise Asked(runs, flags)
    monkeypatch.setitem(reproduce.TABLES, "ktg", table)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Asked) as other:
        reproduce.main(reproduce.parse_args(["ktg", "--dataset", "cifar10", "--data-dir", "d"]))
    with pytest.raises(Asked) as mini:
        reproduce.main(reproduce.parse_args(["ktg", "--quick"]))
    runs, flags = other.value.args
    assert str(runs) == "results/ktg-cifar10/runs" and flags[:4] == ["--dataset", "cifar10", "--data-dir", "d"]
    runs, flags = mini.value.args
    assert str(runs) == "results/ktg-quick/runs" and "--dataset" not in flags


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0", "0"], "--seeds repeats a seed"),
    (["--seeds", "1", "-1"], "--seeds must be non-negative"),
    (["--data-dir", "somewhere"], "--data-dir needs --dataset"),
    (["--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir"),
])
def test_bad_flags_are_refused(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        make_table("dml", tmp_path, *argv)


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "table").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        make_table("dml", tmp_path / "table")
    with pytest.raises(UserError, match="table is a file, not a folder"):  # or under one
        make_table("dml", tmp_path / "table" / "sub")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "table.md").write_text("my notes")
    with pytest.raises(UserError, match="is not a table folder of this project"):  # a user's folder
        make_table("dml", tmp_path / "mine")
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["table.md"]
    (tmp_path / "other" / "runs").mkdir(parents=True)
    (tmp_path / "other" / "table.json").write_text('{"table": "takd"}')
    with pytest.raises(UserError, match="holds the takd table: give the dml table another --out"):
        make_table("dml", tmp_path / "other")


@pytest.mark.parametrize("args_json", [None, "not json"])
def test_a_finished_run_without_readable_arguments_is_refused_in_one_line(tmp_path, args_json):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text("{}")
    if args_json is not None:
        (folder / "args.json").write_text(args_json)
    with pytest.raises(UserError, match="has results.json but no readable args.json"):
        reproduce.train(dml, folder, ["--epochs", "1"])


def test_several_processes_are_refused_in_one_line(tmp_path):
    """Under `fabric run --devices 2` each process would run the table: one held a
    run's lock while waiting for the other in the process group's set-up, and the
    other waited for the lock, for ever. Now each process stops with one line."""
    fabric = os.path.join(os.path.dirname(sys.executable), "fabric")
    result = subprocess.run([fabric, "run", "--accelerator", "cpu", "--devices", "2", "--main-port", str(free_port()),
                             "reproduce.py", "dml",
                             "--quick", "--out", str(tmp_path / "table")], cwd=ROOT, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if "error:" in line]
    assert said == ["error: reproduce.py runs in one process (here WORLD_SIZE=2): start it with python, not fabric "
                    "run or torchrun"], result.stderr[-3000:]
    assert "interrupted" not in result.stderr and str(ROOT / "reproduce.py") not in result.stderr  # no traceback
    assert not (tmp_path / "table").exists()
