"""Helpers shared by the tests: run a script in this process or as its own, read
what it wrote, kill it when it has reached a given point."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

if "PYTEST_XDIST_WORKER" in os.environ:  # pytest -n: one thread per worker, and its runs' subprocesses
    os.environ["OMP_NUM_THREADS"] = "1"  # (threads spinning against each other's cores cost more than they give)

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_main(script, *argv):
    """Run a method script's `main` in this process (no interpreter start-up, no
    imports): `run_main(dml, "--epochs", "1", ...)`. A UserError propagates."""
    script.main(script.parse_args([str(arg) for arg in argv]))


def run_script(*args, check=True):
    """Run a project script as a user would, in a process of its own; returns the CompletedProcess."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def fabric_run(*args, devices=2, timeout=300):
    """Run a script under `fabric run` on `devices` CPU processes (DDP on gloo)."""
    fabric = os.path.join(os.path.dirname(sys.executable), "fabric")
    result = subprocess.run([fabric, "run", "--accelerator", "cpu", "--devices", str(devices), "--main-port",
                             str(free_port()), *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port():
    """A port no one listens on: two-process runs of tests run side by side (pytest -n) must not share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def results(folder):
    return json.loads((Path(folder) / "results.json").read_text())


def wait_for(condition, what, timeout=180, process=None):
    """Poll `condition()` until it is true; fail naming `what` after `timeout` s or if `process` ends first."""
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_when(*args, out, marker):
    """Start a run with `--out out` and SIGKILL it as soon as the file `marker` exists
    (e.g. its first epoch's metrics.csv, written after the first checkpoint)."""
    process = subprocess.Popen([sys.executable, *map(str, args), "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(marker.exists, f"{marker} to be written", process=process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "results.json").exists(), "the run ended before it was killed"


def metrics_without_speed(path):
    """metrics.csv without its img_per_s column: what a resumed run must reproduce exactly."""
    lines = Path(path).read_text().splitlines()
    keep = [i for i, name in enumerate(lines[0].split(",")) if name != "img_per_s"]
    return [[line.split(",")[i] for i in keep] for line in lines]


def snapshot(folder):
    """Every file under `folder` and its bytes."""
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


class FakeFabric:
    """The part of Fabric that data loaders and evaluation loops use, for one process."""

    def __init__(self, rank=0, world_size=1, device="cpu"):
        self.device, self.global_rank, self.world_size = torch.device(device), rank, world_size
        self.is_global_zero = rank == 0

    def print(self, *args):
        print(*args)

    @staticmethod
    def all_reduce(tensor, reduce_op="mean"):
        return tensor

    def to_device(self, obj):
        return obj.to(self.device)

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def png_size(path):
    """(width, height) of a PNG file: it decodes, so it is a whole picture."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.size
