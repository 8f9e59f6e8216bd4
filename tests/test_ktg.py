"""ktg_ensemble.py end to end on the embedded data: presets, a graph file, the search and its workers, bad input."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch

import ktg_ensemble
from common.launch import UserError
from conftest import ROOT, FakeFabric, png_size, results, run_main, wait_for

NODES = ["--nodes", "resnet8_abn", "resnet8_abn"]
QUICK = ["--epochs", "2", "--train-subset", "300", "--batch-size", "50"]
SEARCH = [*NODES, "--epochs", "2", "--train-subset", "200", "--batch-size", "50"]


def study_trials(storage, name="ktg"):
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def finished(trials):
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


@pytest.mark.parametrize("preset", ["dml", "independent"])
def test_presets_end_to_end(tmp_path, preset):
    out = tmp_path / preset
    run_main(ktg_ensemble, *NODES, "--graph", preset, *QUICK, "--out", out)
    for name in ("args.json", "metrics.csv", "results.json", "last.ckpt", "best.ckpt", "curves.png", "graph.png",
                 "attention.png"):
        assert (out / name).is_file(), name
    res = results(out)
    assert res["method"] == "ktg_ensemble" and res["dataset"] == "cifar10-mini" and res["epochs"] == 2
    assert res["graph"]["nodes"] == ["resnet8_abn", "resnet8_abn"] and res["seed"] == 0
    assert len(res["graph"]["edges"]) == (4 if preset == "dml" else 2)
    assert [node["name"] for node in res["nodes"]] == ["resnet8_abn", "resnet8_abn"]
    assert res["node_mean_top1"] == pytest.approx(sum(node["top1"] for node in res["nodes"]) / 2)
    assert res["ensemble_top1"] > 15 and res["train_img_per_s"] > 0 and res["wall_s"] > 0  # chance is 10 %
    # diagnostics: how often two nodes agree (%), on the test images of every epoch; each node's fit of its images
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert all(0 <= float(row["agreement"]) <= 100 for row in rows)
    assert res["agreement"] == float(rows[-1]["agreement"]) and 0 <= res["agreement"] <= 100
    assert all(0 <= node["train_top1"] <= 100 for node in res["nodes"])
    assert res["train_top1_mean"] == pytest.approx(sum(node["train_top1"] for node in res["nodes"]) / 2)
    assert png_size(out / "graph.png") == (700, 700)
    assert png_size(out / "attention.png") == (600, 1100)  # 5 images × (the image and 2 nodes' maps)
    # one test image of each of the first five classes, with each node's prediction
    shown = list(csv.DictReader(open(out / "attention.csv")))
    assert [row["label"] for row in shown] == ["airplane", "automobile", "bird", "cat", "deer"]
    assert all(row["0: resnet8_abn"] and row["1: resnet8_abn"] for row in shown)


def test_eval_pretrained_and_weights_out(tmp_path):
    from safetensors.torch import load_file

    from common.models import create_model

    out = tmp_path / "run"
    run_main(ktg_ensemble, *NODES, "--graph", "dml", "--epochs", "1", "--train-subset", "100", "--batch-size", "50",
             "--out", out)
    model = create_model("resnet8_abn", 10, 32)
    model.load_state_dict(load_file(out / "node1.safetensors"))  # strict
    run_main(ktg_ensemble, "--eval", out / "last.ckpt", "--out", tmp_path / "eval")
    trained, evaluated = results(out), json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["graph"] == trained["graph"] and evaluated["ensemble_top1"] == trained["ensemble_top1"]
    assert [n["top1"] for n in evaluated["nodes"]] == [n["top1"] for n in trained["nodes"]]
    run_main(ktg_ensemble, *NODES, "--graph", "independent", "--pretrained", out / "node0.safetensors", "--epochs", "1",
             "--train-subset", "100", "--batch-size", "50", "--out", tmp_path / "pretrained")
    reports = results(tmp_path / "pretrained")["pretrained"]
    assert len(reports) == 2 and all(r["skipped"] == [] and r["loaded"] > 0 for r in reports)


def test_graph_from_a_file(tmp_path):
    graph = {"nodes": ["resnet8_abn", "resnet8"],
             "edges": [{"source": "label", "target": 0, "loss": "ce", "gate": "through"},
                       {"source": "label", "target": 1, "loss": "ce", "gate": "linear"},
                       {"source": 1, "target": 0, "loss": "prob_repel", "gate": "correct"},
                       {"source": 0, "target": 1, "loss": "prob_attract", "gate": "cutoff"}]}
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    out = tmp_path / "run"
    run_main(ktg_ensemble, "--graph", tmp_path / "graph.json", "--epochs", "3", "--eval-every", "2",
             "--train-subset", "100", "--batch-size", "50", "--out", out)
    assert results(out)["graph"] == graph
    # the test split every second epoch and at the last; best.ckpt (no --val-split) chosen among those epochs
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    tested = ["top1_0", "top1_1", "top1_ensemble", "agreement"]
    assert [[row[column] != "" for column in tested] for row in rows] == [[False] * 4, [True] * 4, [True] * 4]
    assert torch.load(out / "best.ckpt", weights_only=True)["epoch"] in (2, 3)


def test_identical_nodes_agree_on_every_image():
    from common.data import load_dataset, make_loader
    from common.models import create_model

    data = load_dataset("cifar10-mini")
    images, labels = data["test"]
    node = create_model("resnet8_abn", 10, 32)
    # 200 images in batches of 64: the last batch is padded, and padding must not count
    loader = make_loader({**data, "test": (images[:200], labels[:200])}, "test", 64, FakeFabric())
    columns = ktg_ensemble.evaluate([node, node], loader, FakeFabric())
    assert columns["agreement"] == 100.0 and columns["top1_0"] == columns["top1_1"] == columns["top1_ensemble"]
    assert ktg_ensemble.evaluate([node, node], None, FakeFabric(), prefix="val_") == dict.fromkeys(
        ["val_top1_0", "val_top1_1", "val_top1_ensemble", "val_agreement"])


def test_search_writes_study_table_and_best_graph(tmp_path):
    out = tmp_path / "search"
    run_main(ktg_ensemble, *SEARCH, "--search", "3", "--out", out)
    for name in ("study.db", "trials.csv", "best_graph.json", "results.json", "graph.png", "last.ckpt"):
        assert (out / name).is_file(), name
    trials = study_trials(f"sqlite:///{out / 'study.db'}")
    assert len(finished(trials)) == 3
    table = (out / "trials.csv").read_text().splitlines()
    assert table[0].startswith("number,state,val_error,epochs,duration_s,worker") and len(table) == 1 + len(trials)
    assert "0_to_1_loss" in table[0] and "label_to_0_gate" in table[0]
    res = results(out)
    search = res["search"]
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert search["best_val_error"] == best.value and search["completed"] + search["pruned"] == 3
    assert json.loads((out / "best_graph.json").read_text()) == search["best_graph"] == res["graph"]
    assert best.user_attrs["graph"] == res["graph"]
    # scored on 20 % of the training set held out by --split-seed, which also chose best.ckpt
    assert search["val_split"] == 0.2 and search["val_split_seed"] == 0 and res["best_on"] == "validation"
    assert png_size(out / "search.png") in ((1200, 450), (1800, 450))  # history, curves (and importances)


def test_search_prunes_a_graph_with_an_untrained_node_and_keeps_one_split(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="ktg", direction="minimize")
    # every edge into node 1 cut off: it would keep its random weights
    study.enqueue_trial({"label_to_0_gate": "through", "label_to_1_gate": "cutoff", "0_to_1_loss": "prob_attract",
                         "0_to_1_gate": "cutoff", "1_to_0_loss": "prob_attract", "1_to_0_gate": "through"})
    run_main(ktg_ensemble, *SEARCH, "--search", "4", "--storage", storage, "--out", tmp_path / "w0")
    first = study_trials(storage)[0]
    assert first.state.name == "PRUNED" and first.intermediate_values == {}  # pruned before any training
    with pytest.raises(UserError, match="scores on --val-split 0.2 --split-seed 0: give this worker the same"):
        run_main(ktg_ensemble, *SEARCH, "--search", "3", "--storage", storage, "--split-seed", "1",
                 "--out", tmp_path / "w1")


def test_killed_search_keeps_its_finished_trials(tmp_path):
    out = tmp_path / "search"
    storage = f"sqlite:///{out / 'study.db'}"
    args = [*SEARCH, "--search", "4", "--heartbeat-grace", "3", "--out", out]
    process = subprocess.Popen([sys.executable, "ktg_ensemble.py", *map(str, args)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def inside_second_trial():
        try:
            trials = study_trials(storage)
        except Exception:  # no database yet, or no study in it yet
            return False
        return len(finished(trials)) >= 1 and any(t.state.name == "RUNNING" for t in trials)

    try:
        wait_for(inside_second_trial, "the search's second trial", process=process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = time.time()
    before = {t.number: t.state.name for t in finished(study_trials(storage))}
    assert 1 <= len(before) < 4
    # The killed trial beats no more: after the grace period any worker may mark it failed.
    wait_for(lambda: time.time() > killed_at + 3, "the grace period")
    run_main(ktg_ensemble, *args, "--resume")
    trials = study_trials(storage)
    assert {t.number: t.state.name for t in trials if t.number in before} == before  # kept, not rerun
    assert len(finished(trials)) == 4
    assert [t.state.name for t in trials].count("FAIL") == 1  # the trial the kill interrupted
    assert not any(t.state.name == "RUNNING" for t in trials)
    assert (out / "best_graph.json").is_file()


def test_two_workers_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # two workers on two cores: no oversubscription
    workers = [subprocess.Popen([sys.executable, "ktg_ensemble.py", *SEARCH, "--search", "4", "--storage", storage,
                                 "--study-name", "shared", "--seed", str(seed), "--out", str(tmp_path / f"w{seed}")],
                                cwd=ROOT, env=one_thread, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for seed in (0, 1)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=400)
        assert worker.returncode == 0, stderr[-2000:]
    trials = study_trials(storage, "shared")
    assert 4 <= len(finished(trials)) <= 5  # a worker may finish one trial past the target
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    for seed in (0, 1):
        assert results(tmp_path / f"w{seed}")["search"]["study_name"] == "shared"


# --- bad input: one line, non-zero exit ----------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "resnet8_abn"], "2 to 8 network nodes"),
    (["--graph", "/nonexistent/graph.json"], "neither a preset"),
    (["--val-split", "1.5"], "--val-split must lie in [0, 1)"),
    (["--search", "3", "--val-split", "0"], "--val-split must be above 0"),
    (["--search", "-2"], "--search must be a number of trials"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--crop-sizes", "3", "0"], "--crop-sizes must be positive"),
    (["--heartbeat-grace", "0"], "--heartbeat-grace must be positive"),
    (["--eval-every", "0"], "--eval-every must be positive"),
])
def test_bad_flags(flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        ktg_ensemble.check_args(ktg_ensemble.parse_args(flags))


def test_unknown_node_model(tmp_path):
    with pytest.raises(UserError, match="unknown model 'resnet_typo'"):
        run_main(ktg_ensemble, "--nodes", "resnet8_abn", "resnet_typo", "--train-subset", "50",
                 "--out", tmp_path / "run")
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_attention_edge_between_plain_resnets_is_refused(tmp_path):
    graph = {"nodes": ["resnet8", "resnet8"],
             "edges": [{"source": "label", "target": 0, "loss": "ce", "gate": "through"},
                       {"source": 0, "target": 1, "loss": "att_attract", "gate": "through"}]}
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    with pytest.raises(UserError, match="attention losses need attention maps"):
        run_main(ktg_ensemble, "--graph", tmp_path / "graph.json", "--out", tmp_path / "run")


def test_learning_rate_schedule():
    # ÷10 at 30, 60 and 90 % of the epochs (60, 120, 180 of 200)
    args = ktg_ensemble.parse_args(["--epochs", "10", "--warmup-epochs", "0"])
    assert [ktg_ensemble.learning_rate(args, epoch, 0, 10) for epoch in (0, 2, 3, 5, 6, 8, 9)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4])
    args = ktg_ensemble.parse_args(["--epochs", "10", "--batch-size", "128"])
    assert ktg_ensemble.learning_rate(args, 0, 4, 10) == pytest.approx(0.1)  # half way through the warm-up
    assert ktg_ensemble.learning_rate(args, 1, 0, 10) == pytest.approx(0.2)  # 0.1 at batch 64, scaled


def test_a_trial_stopped_by_ctrl_c_is_logged_without_a_traceback(tmp_path, caplog):
    import argparse

    from common.study import open_study

    args = argparse.Namespace(storage=None, study_name="quiet", heartbeat_grace=15, seed=0, val_split=0.2, split_seed=0)
    study, _ = open_study(args, tmp_path)

    def objective(trial):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=1)
    study.optimize(lambda trial: (_ for _ in ()).throw(UserError("the loss became NaN")), n_trials=1,
                   catch=(UserError,))
    assert "the loss became NaN" in caplog.text and "KeyboardInterrupt" not in caplog.text
    assert not any(record.exc_info for record in caplog.records)  # Optuna's handler prints no traceback


@pytest.mark.parametrize("flags, note", [(["--search", "2", "--graph", "independent"], "--graph independent has no "
                                          "effect with --search"),
                                         (["--storage", "sqlite:///x.db", "--study-name", "s"],
                                          "--storage and --study-name have no effect without --search"),
                                         (["--heartbeat-grace", "99"], "--heartbeat-grace has no effect without "
                                          "--search")])
def test_flags_without_effect_get_a_note(flags, note, capsys):
    ktg_ensemble.check_args(ktg_ensemble.parse_args(flags))
    assert f"note: {note}" in capsys.readouterr().out


def test_a_crop_larger_than_the_attention_map_gets_a_note_and_the_whole_map(tmp_path, capsys):
    from common.losses import attention_crops

    run_main(ktg_ensemble, *NODES, "--graph", "dml", "--img-size", "16", "--epochs", "1", "--train-subset", "100",
             "--batch-size", "50", "--out", tmp_path / "run")
    assert "note: resnet8_abn's attention maps are 8×8 at 16 px: a --crop-sizes window above 8 is the whole map" in \
        capsys.readouterr().out
    maps = torch.rand(2, 8, 8)
    (whole, _), = attention_crops(maps, maps, [11])
    assert whole.shape == (2, 64)  # clamped to the map, never wrapped around its border


def test_a_trial_whose_worker_died_before_its_first_heartbeat_fails_and_the_wait_ends(tmp_path):
    import argparse
    import threading

    from optuna.trial import TrialState

    from common.study import open_study, wait_for_running_trials

    args = argparse.Namespace(storage=None, study_name="orphan", heartbeat_grace=1, seed=0, val_split=0.2, split_seed=0)
    study, storage = open_study(args, tmp_path)
    study.ask()  # RUNNING, and no heartbeat: Optuna alone would wait for it forever
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(wait_for_running_trials(study, storage)), daemon=True)
    waiter.start()
    waiter.join(timeout=30)
    assert waited, "still waiting for a trial nobody runs"
    assert [t.state for t in waited[0]] == [TrialState.FAIL]


def test_crop_sizes_without_an_attention_edge_get_a_note(capsys):
    ktg_ensemble.check_args(ktg_ensemble.parse_args(["--nodes", "resnet8", "resnet8", "--crop-sizes", "3"]))
    assert "note: --crop-sizes has no effect: no edge of the graph has an attention loss" in capsys.readouterr().out


def test_a_graph_without_a_label_edge_gets_a_note(tmp_path, capsys):
    edges = [{"source": 0, "target": 1, "loss": "prob_attract", "gate": "through"},
             {"source": 1, "target": 0, "loss": "prob_attract", "gate": "through"}]
    (tmp_path / "graph.json").write_text(json.dumps({"nodes": ["resnet8", "resnet8"], "edges": edges}))
    ktg_ensemble.check_args(ktg_ensemble.parse_args(["--nodes", "resnet8", "resnet8", "--graph",
                                                      str(tmp_path / "graph.json")]))
    assert "note: no edge of the graph comes from the label" in capsys.readouterr().out
