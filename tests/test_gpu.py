"""The whole GPU path on a real GPU, in one command of a few minutes
(`python -m pytest -q tests/test_gpu.py`; skipped without CUDA): each script's
one-epoch run on CUDA in bf16-mixed and in 16-mixed, compiled and not, with the
step's optional parts (clipping, EMA, accumulation, DeiT's recipe), a 16-mixed
run resumed exactly, two GPUs where there are two, and bench.py at 32 and 224
pixels. Each run prints its img/s: paste the output into a report."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port, kill_when, metrics_without_speed, results, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = ["--epochs", "1", "--train-subset", "2000", "--batch-size", "128"]
COMMANDS = {
    "dml": ["dml.py", "--students", "vit_micro", "resnet8"],
    "deit": ["deit.py", "--model", "deit_micro"],
    "takd": ["takd.py", "--chain", "plain4", "plain2"],
    "ktg": ["ktg_ensemble.py", "--nodes", "resnet8_abn", "resnet8_abn", "--graph", "dml"],
}
EXTRAS = {  # the optional parts of a step, where a script has them
    "dml": ["--clip-grad", "1", "--model-ema", "--grad-accum-steps", "2"],
    "deit": ["--clip-grad", "1", "--model-ema", "--recipe", "deit", "--repeated-aug", "1"],
}


def fabric_run(out, command, devices, *flags, precision="bf16-mixed"):
    fabric = shutil.which("fabric") or os.path.join(os.path.dirname(sys.executable), "fabric")
    result = subprocess.run([fabric, "run", "--accelerator", "cuda", "--devices", str(devices), "--main-port",
                             str(free_port()), "--precision", precision, *map(str, command), *SMALL, *map(str, flags),
                             "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    res = results(out)
    assert res["precision"] == precision and res["world_size"] == devices
    print(f"{command[0]} {precision} x{devices} {' '.join(map(str, flags))}: "
          f"{res.get('train_img_per_s') or 0:.0f} img/s")
    return res


# every script in bf16, eager and compiled; in 16-mixed those with a loss-scaled clipping path
RUNS = [(method, compile, "bf16-mixed") for method in COMMANDS for compile in (False, True)]
RUNS += [(method, False, "16-mixed") for method in ("dml", "deit")]


@pytest.mark.parametrize("method, compile, precision", RUNS,
                         ids=[f"{m}-{'compiled' if c else 'eager'}-{p}" for m, c, p in RUNS])
def test_one_gpu(tmp_path, method, compile, precision):
    flags = (["--compile"] if compile else []) + EXTRAS.get(method, [])
    fabric_run(tmp_path / "run", COMMANDS[method], 1, *flags, precision=precision)


def test_deit_with_a_teacher_on_gpu(tmp_path):
    teacher = fabric_run(tmp_path / "teacher", ["deit.py", "--model", "resnet8", "--distillation-type", "none"], 1)
    for precision in ("bf16-mixed", "16-mixed"):
        res = fabric_run(tmp_path / precision, ["deit.py", "--model", "deit_micro", "--teacher", "resnet8",
                                                "--teacher-ckpt", tmp_path / "teacher" / "last.ckpt",
                                                "--distillation-type", "hard"], 1, "--compile", precision=precision)
        # the frozen teacher, in the run's precision, scores what it scored when it was trained
        assert abs(res["teacher_top1"] - teacher["top1"]) < 1 and res["teacher_agreement"] is not None


def test_16_mixed_resume_is_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("LT_PRECISION", "16-mixed")  # read by Fabric, as `fabric run --precision` sets it
    args = [*COMMANDS["dml"], *SMALL, "--epochs", "2"]
    run_script(*args, "--out", tmp_path / "whole")
    kill_when(*args, out=tmp_path / "part", marker=tmp_path / "part" / "metrics.csv")  # after its first epoch
    run_script(*args, "--out", tmp_path / "part", "--resume")
    # cuDNN's and cuBLAS's kernels are not bit-reproducible from run to run (the CPU tests check exactness):
    # the resumed run must follow the whole one closely, and carry on its GradScaler
    (header, *part), (same, *whole) = (metrics_without_speed(tmp_path / run / "metrics.csv")
                                       for run in ("part", "whole"))
    assert header == same and len(part) == len(whole) == 2
    for resumed, straight in zip(part, whole):
        assert list(map(float, resumed)) == pytest.approx(list(map(float, straight)), rel=0.05)
    assert "loss_scale" in torch.load(tmp_path / "part" / "last.ckpt", map_location="cpu", weights_only=False)
    assert results(tmp_path / "part")["precision"] == "16-mixed"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("method", list(COMMANDS))
def test_two_gpus(tmp_path, method):
    fabric_run(tmp_path / "run", COMMANDS[method], 2, *EXTRAS.get(method, []))


@pytest.mark.parametrize("img_size", [32, 224])
def test_bench(tmp_path, img_size):
    result = subprocess.run([sys.executable, "bench.py", "--steps", "20", "--img-size", str(img_size), "--json",
                             str(tmp_path / "bench.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["img_size"] == img_size and report["device"] != "cpu"
    assert all(method["img_per_s"] > 0 and 0 < method["mfu"] < 1 for method in report["methods"].values())
