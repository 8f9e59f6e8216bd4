"""reproduce.py: every table end to end on 100 training images (--quick), and the
reuse and resumption of its runs."""
import json
import statistics

import pytest

import deit
import dml
import ktg_ensemble
import reproduce
import takd
from common.run import UserError
from conftest import png_size


def make_table(table, out, *extra):
    reproduce.main(reproduce.parse_args([table, "--quick", "--out", str(out), *extra]))
    return json.loads((out / "table.json").read_text())


def row(table, method, metric):
    return next(r for r in table["rows"] if r["method"] == method and r["metric"] == metric)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """Each table made once with --quick (2 seeds, 1 epoch, 100 training images)."""
    root = tmp_path_factory.mktemp("tables")
    return {name: (make_table(name, root / name), root / name) for name in reproduce.TABLES}


@pytest.mark.parametrize("name", list(reproduce.TABLES))
def test_quick_table_writes_rows_claims_and_pictures(tables, name):
    table, out = tables[name]
    assert table["table"] == name and table["seeds"] == [0, 1] and table["quick"]
    for r in table["rows"]:
        assert r["mean"] == pytest.approx(statistics.mean(r["values"]), abs=1e-3)
        if len(r["values"]) > 1:
            assert r["std"] == pytest.approx(statistics.stdev(r["values"]), abs=1e-3)
    seeded = [r for r in table["rows"] if "trained once" not in r["method"] and "search" not in r["method"]]
    assert seeded and all(len(r["values"]) == 2 for r in seeded)
    assert table["claims"] and all(isinstance(c["holds"], bool) for c in table["claims"])
    assert all(c["holds"] == (c["margin"] > 0) for c in table["claims"] if "hindsight" not in c["claim"])
    markdown = (out / "table.md").read_text()
    assert all(r["method"] in markdown for r in table["rows"]) and all(c["claim"] in markdown for c in table["claims"])
    assert png_size(out / "table.png")[0] > 0
    assert table["runs_wall_s"] > 0


def test_dml_claims_follow_from_the_rows(tables):
    table, out = tables["dml"]

    def students(method):
        return statistics.mean(row(table, method, f"top-1 student {k} (vit_micro)")["mean"] for k in (1, 2))
    claim = table["claims"][0]
    assert claim["claim"].startswith("DML (ViT) > Independent")
    assert claim["margin"] == pytest.approx(students("DML (ViT), equal") - students("Independent (ViT), equal"),
                                            abs=2e-3)
    assert (out / "landscape.png").is_file()
    rises = row(table, "DML (ViT), equal", "landscape: loss rise at the largest σ")["values"]
    assert len(rises) == 2 and all(rise > 0 for rise in rises)  # noise on the weights raises the loss


def test_takd_table_compares_the_automatic_choice_with_hindsight(tables):
    table, out = tables["takd"]
    sweep = [row(table, f"TAKD via {c}", "top-1")["values"] for c in ("plain4", "plain6", "plain8")]
    assert row(table, "TAKD, best assistant in hindsight (chosen on test)", "top-1")["values"] == \
        [max(values) for values in zip(*sweep)]
    choice = table["claims"][-1]
    assert len(choice["chosen"]) == 2 and set(choice["chosen"]) <= {"plain4", "plain6", "plain8"}
    # the teacher was trained once and loaded by every seed's runs
    teacher = out / "runs" / "teacher" / "plain10" / "last.ckpt"
    args = json.loads((out / "runs" / "auto" / "seed1" / "args.json").read_text())
    assert teacher.is_file() and args["teacher_ckpt"] == str(teacher)


def test_deit_and_ktg_use_one_teacher_and_one_search(tables):
    table, out = tables["deit"]
    for method in ("soft (deit_micro)", "hard (deit_micro)"):
        args = json.loads((out / "runs" / reproduce.slug(method) / "seed0" / "args.json").read_text())
        assert args["teacher_ckpt"] == str(out / "runs" / "teacher" / "resnet20" / "last.ckpt")
    table, out = tables["ktg"]
    graph = json.loads((out / "runs" / "search" / "best_graph.json").read_text())
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
    again = make_table("dml", out)
    assert [(args.out, args.resume) for args in calls] == [(str(killed), True)]
    assert again["rows"] == table["rows"] and again["claims"] == table["claims"]


def test_repeated_seeds_are_refused(tmp_path):
    with pytest.raises(UserError, match="--seeds repeats a seed"):
        make_table("dml", tmp_path, "--seeds", "0", "0")
