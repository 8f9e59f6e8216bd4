"""bench.py: its report on a short measurement; img/s timed over exactly the steps it counts, epoch after epoch;
tests/bench_dml.py's baseline on the device dml.py trains on."""
import json
from types import SimpleNamespace

import pytest
import torch

import bench
import bench_dml
from common.data import load_dataset
from common.launch import make_fabric


def test_bench_reports_every_field(tmp_path, monkeypatch):
    peak_gflops = bench.peak_gflops
    monkeypatch.setattr(bench, "peak_gflops", lambda fabric: peak_gflops(fabric, size=512, repeats=2))
    report = bench.main(bench.parse_args(["--methods", "takd", "--steps", "2", "--batch-size", "16",
                                          "--json", str(tmp_path / "bench.json")]))
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    result = report["methods"]["takd"]
    assert set(result) == {"batch_size", "img_per_s", "synced_img_per_s", "gflop_per_img", "breakdown",
                           "peak_memory_mb", "teacher_share", "mfu"}
    assert result["batch_size"] == 16 and 0 < result["teacher_share"] < 1
    # plain10 → plain4 at 32 px: the teacher's forward and the student's forward and backward, about 0.18 GFLOP
    assert 0.1 < result["gflop_per_img"] < 0.3
    assert abs(sum(result["breakdown"].values()) - 1) < 1e-6 and min(result["breakdown"].values()) >= 0
    # one worker of the streamed path: a 500×375 JPEG of about 110 KB decoded and cropped to 224 px in 0.5-100 ms
    assert report["decode_img_size"] == 224 and 80 < report["decode_file_kb"] < 140
    assert 10 < report["decode_img_per_s_per_worker"] < 2000 and report["loader_workers"] >= 1


def test_img_per_s_is_timed_over_the_steps_it_counts(monkeypatch):
    """On a clock that only the forward advances, 50 ms a step: img/s is batch / 50 ms exactly when the timed
    steps are the steps counted, and the forward is the whole breakdown. 64 images in batches of 32 are an epoch
    of two batches: the 12 batches measured span six epochs."""
    clock = [0.0]

    def step_of_50_ms(method, fabric, data, compile=False):
        def forward(models, images, labels):
            clock[0] += 0.05
            return torch.nn.functional.cross_entropy(models[0](images), labels)
        return 32, [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))], forward, None

    monkeypatch.setattr(bench, "method_step", step_of_50_ms)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    result = bench.measure("dml", make_fabric(), load_dataset("cifar10-mini", train_subset=64), steps=4)
    assert result["img_per_s"] == pytest.approx(32 / 0.05) and result["synced_img_per_s"] == pytest.approx(32 / 0.05)
    assert result["breakdown"] == pytest.approx({"data": 0, "forward": 1, "backward": 0, "optimizer": 0, "other": 0})


def test_bench_dml_baseline_runs_on_the_device_dml_py_trains_on():
    assert bench_dml.dml_device() == make_fabric().device
    # the meta device computes only shapes: a model or a batch left on the CPU would fail
    assert bench_dml.baseline_img_per_s(["vit_micro", "vit_micro"], 30, 10, 0, torch.device("meta")) > 0


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be positive, got 0"),  # a KeyError traceback before
    (["--batch-size", "-4"], "--batch-size must be positive, got -4"),  # hung before
    (["--img-size", "0"], "--img-size must be positive, got 0"),  # measured on and reported 0 px before
    (["--data-dir", "/nonexistent"], "--data-dir /nonexistent: no train/ folder"),
    (["--json", "/"], "--json /: a folder"),  # refused before the measurement, not after it
])
def test_bad_input_is_one_line_before_any_measurement(flags, message):
    from common.launch import UserError

    with pytest.raises(UserError, match=message):
        bench.check_args(bench.parse_args(flags))


@pytest.mark.parametrize("method", bench.METHODS)
def test_each_method_step_is_its_scripts_loss(method):
    """The step bench.py times is the script's: its loss function's terms summed to one scalar that trains."""
    fabric = make_fabric()
    _, models, forward, teach = bench.method_step(method, fabric, load_dataset("cifar10-mini", train_subset=100))
    images, labels = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    loss = forward(models, images, labels, *([teach(images)] if teach else []))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.grad_fn is not None
