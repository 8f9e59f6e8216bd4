"""common/run.py: the one-line error, run folders, atomic checkpoints, the schedules."""
import re

import pytest

from common.run import (UserError, evaluates_test, exit_on_user_error, prepare_run_folder, require_positive,
                        step_schedule)
from conftest import FakeFabric


class FolderFabric(FakeFabric):
    is_global_zero = True

    def barrier(self):
        pass


def test_user_error_is_one_line_and_status_2(capsys):
    def main(args):
        # a UserError raised in a DataLoader worker arrives with the worker's traceback before it
        raise UserError("Caught UserError in DataLoader worker process 0.\nTraceback ...\ncannot read image x.jpg")

    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(main, None)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: cannot read image x.jpg\n"


def test_run_folder_rules(tmp_path):
    fabric = FolderFabric()
    out = prepare_run_folder(fabric, tmp_path / "run", resume=False, overwrite=False)
    assert out.is_dir()
    (out / "last.ckpt").write_bytes(b"x")
    with pytest.raises(UserError, match="exists and is not empty"):
        prepare_run_folder(fabric, out, resume=False, overwrite=False)
    with pytest.raises(UserError, match="exclude each other"):
        prepare_run_folder(fabric, out, resume=True, overwrite=True)
    with pytest.raises(UserError, match="no .*args.json to resume from"):
        prepare_run_folder(fabric, out, resume=True, overwrite=False, marker="args.json")
    assert prepare_run_folder(fabric, out, resume=True, overwrite=False) == out and (out / "last.ckpt").exists()
    prepare_run_folder(fabric, out, resume=False, overwrite=True)
    assert out.is_dir() and not any(out.iterdir())


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
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_:
        dml.parse_args(["--config", str(tmp_path / "broken.json")])
    assert exit_.value.code == 2 and "cannot read it as JSON" in capsys.readouterr().err


class Stop(Exception):
    pass


@pytest.mark.parametrize("name", ["dml", "deit", "takd", "ktg_ensemble"])
def test_split_seed_not_seed_picks_the_subset_and_the_held_out_images(name, tmp_path, monkeypatch):
    """`--seed` varies weights, order and augmentation; the images trained on and
    held out follow `--split-seed` alone, so that seeds of a table share them."""
    import importlib

    from common.data import load_dataset
    script = importlib.import_module(name)
    seeds = []
    monkeypatch.setattr(script, "load_dataset", lambda *args: seeds.append(("subset", args[-1])) or load_dataset(*args))

    def held_out(data, fraction, seed):
        seeds.append(("held out", seed))
        raise Stop  # the images are chosen: no need to train
    monkeypatch.setattr(script, "hold_out", held_out)
    with pytest.raises(Stop):
        script.main(script.parse_args(["--seed", "3", "--split-seed", "7", "--train-subset", "100", "--val-split",
                                       "0.2", "--epochs", "1", "--out", str(tmp_path / "run")]))
    assert seeds == [("subset", 7), ("held out", 7)]


def test_curves_are_redrawn_now_and_then_and_after_the_last_epoch(tmp_path, monkeypatch):
    import common.run as run

    drawn = []
    monkeypatch.setattr(run, "save_checkpoint", lambda fabric, path, state: None)
    monkeypatch.setattr(run, "plot_curves", lambda path, rows, panels: drawn.append(len(rows)) or path.touch())
    state = {"history": [], "best_top1": -1.0, "args": {"epochs": 4}}
    for epoch in range(1, 5):
        state["history"].append({"epoch": epoch, "top1": 10.0})
        state["epoch"] = epoch
        run.save_epoch(FolderFabric(), tmp_path, state, 10.0, panels=[])
    assert drawn == [1, 4]  # the first epoch, then none within CURVES_EVERY_S, then the last
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 5  # the CSV is written every epoch
