"""The whole GPU path on a real GPU, in one command (`python -m pytest -q tests/test_gpu.py`):
each script's one-epoch run on CUDA in bf16-mixed, once with --compile, and under
`fabric run --devices 2` where two GPUs are present. Skipped without CUDA."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = ["--epochs", "1", "--train-subset", "2000", "--batch-size", "128"]
COMMANDS = {
    "dml": ["dml.py", "--students", "vit_micro", "resnet8"],
    "deit": ["deit.py", "--model", "deit_micro"],
    "takd": ["takd.py", "--chain", "plain4", "plain2"],
    "ktg": ["ktg_ensemble.py", "--nodes", "resnet8_abn", "resnet8_abn", "--graph", "dml"],
}


def fabric_run(out, command, devices, *flags):
    fabric = os.path.join(os.path.dirname(sys.executable), "fabric")
    result = subprocess.run([fabric, "run", "--accelerator", "cuda", "--devices", str(devices), "--precision",
                             "bf16-mixed", *command, *SMALL, *flags, "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    res = results(out)
    assert res["precision"] == "bf16-mixed" and res["world_size"] == devices
    return res


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("method", list(COMMANDS))
def test_one_gpu(tmp_path, method, compile):
    flags = ["--compile"] if compile else []
    fabric_run(tmp_path / "run", COMMANDS[method], 1, *flags)


def test_deit_with_a_teacher_on_gpu(tmp_path):
    fabric_run(tmp_path / "teacher", ["deit.py", "--model", "resnet8", "--distillation-type", "none"], 1)
    res = fabric_run(tmp_path / "student", ["deit.py", "--model", "deit_micro", "--teacher", "resnet8",
                                            "--teacher-ckpt", tmp_path / "teacher" / "last.ckpt",
                                            "--distillation-type", "hard"], 1, "--compile")
    assert res["teacher_top1"] > 10 and res["teacher_agreement"] is not None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("method", list(COMMANDS))
def test_two_gpus(tmp_path, method):
    fabric_run(tmp_path / "run", COMMANDS[method], 2)
