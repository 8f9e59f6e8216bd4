import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_script(*args, check=True):
    """Run a project script as a user would; returns the CompletedProcess."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def run():
    return run_script


def kill_after_first_epoch(*args, out, metrics=None, delay=1.0):
    """Start a run, SIGKILL it `delay` seconds after it wrote `metrics` (its first
    epoch's metrics.csv, after the first checkpoint), return nothing."""
    process = subprocess.Popen([sys.executable, *map(str, args), "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = metrics or out / "metrics.csv"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(delay)  # into the second epoch
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "results.json").exists(), "the run ended before it was killed"
