"""Run folders, checkpoints and the one-line error every script ends with on bad input.

A run folder holds `args.json`, `metrics.csv`, `results.json`, `last.ckpt`,
`best.ckpt` and plots. Checkpoints are written to a temporary file and renamed,
so a kill at any moment leaves the last good one.
"""
import csv
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from lightning_fabric import Fabric
from lightning_fabric.connector import _is_using_cli


class UserError(Exception):
    """Bad input: the scripts print its message as one line and exit with status 2."""


def exit_on_user_error(main, args):
    """Run `main(args)`; a UserError becomes one line on stderr and exit status 2."""
    try:
        main(args)
    except UserError as error:
        # A UserError raised in a DataLoader worker arrives wrapped with its
        # traceback; its last line is the message.
        message = str(error).strip().splitlines()[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def default_precision():
    """bf16-mixed where the hardware computes in bf16 natively, else full precision."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if " avx512_bf16" in flags or " amx_bf16" in flags else "32-true"


def make_fabric():
    """A launched Fabric. Devices, strategy and precision come from `fabric run`
    flags when given; plain `python script.py` runs on one device with
    `default_precision()`."""
    precision = None if "LT_PRECISION" in os.environ else default_precision()
    fabric = Fabric(precision=precision)
    if not _is_using_cli():  # under `fabric run` the processes exist already
        fabric.launch()
    return fabric


def finish(fabric):
    """End cleanly: two-process CPU DDP can abort at exit without this."""
    fabric.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def step_schedule(lr, epoch, step, steps_per_epoch, milestones, warmup_epochs):
    """The learning rate of a step schedule, ÷10 at each epoch in `milestones`,
    after a linear warm-up over the first `warmup_epochs`. Stateless: the same
    rate after a resume."""
    done = epoch * steps_per_epoch + step + 1
    warmup = min(1.0, done / max(1.0, warmup_epochs * steps_per_epoch))
    return lr * 0.1 ** sum(epoch >= m for m in milestones) * warmup


def cosine_schedule(optimizer, lr, min_lr, epochs, warmup_epochs, steps_per_epoch):
    """timm's per-step cosine schedule with linear warm-up (at most a fifth of the run).
    Stateless: `step_update(global_step)` gives the same rate after a resume."""
    from timm.scheduler import CosineLRScheduler

    warmup = int(min(warmup_epochs, epochs / 5) * steps_per_epoch)
    return CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch - warmup, lr_min=min(min_lr, lr),
                             warmup_t=warmup, warmup_lr_init=lr / 100, warmup_prefix=True, t_in_epochs=False)


def seed_epoch(seed, epoch):
    """Seed torch, numpy and random for one epoch: drop-path, Mixup and the
    DataLoader workers draw the same after a resume as in one go."""
    from lightning_fabric.utilities.seed import seed_everything

    seed_everything(seed * 1000 + epoch, verbose=False)


def check_finite(fabric, loss, epoch, step, out):
    """Stop on a NaN/inf loss, before the optimizer step spoils the weights. Every
    process learns of a bad loss on any of them, so none waits for the others."""
    not_finite = fabric.all_reduce((~torch.isfinite(loss.detach())).float(), reduce_op="sum")
    if not_finite > 0:
        kept = f"; the last good checkpoint is {Path(out) / 'last.ckpt'}" if out is not None else ""
        raise UserError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}: stopped{kept}")


def require_positive(**values):
    for name, value in values.items():
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def prepare_run_folder(fabric, out, resume, overwrite, marker="last.ckpt"):
    """Refuse a non-empty folder unless resuming or overwriting; return the folder.
    `--resume` needs the file `marker` in it.

    Every process checks before rank 0 changes anything, so all agree.
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    exists = out.is_dir() and any(out.iterdir())
    if resume and not (out / marker).is_file():
        raise UserError(f"--resume: no {out / marker} to resume from")
    if exists and not (resume or overwrite):
        raise UserError(f"run folder {out} exists and is not empty: pass --resume or --overwrite, or another --out")
    fabric.barrier()
    if fabric.is_global_zero:
        if exists and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    return out


def save_checkpoint(fabric, path, state):
    """Write through a temporary file and rename: never a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, state)
    if fabric.is_global_zero:
        os.replace(tmp, path)
    fabric.barrier()


def save_epoch(fabric, out, state, top1):
    """End of an epoch: `last.ckpt`, `best.ckpt` if `top1` is the best so far,
    `metrics.csv` and `curves.png` from `state["history"]`."""
    is_best = top1 > state["best_top1"]
    state["best_top1"] = max(state["best_top1"], top1)
    save_checkpoint(fabric, out / "last.ckpt", state)
    if is_best:
        save_checkpoint(fabric, out / "best.ckpt", state)
    if fabric.is_global_zero:
        write_csv(out / "metrics.csv", state["history"])
        plot_curves(out / "curves.png", state["history"])


def load_checkpoint(fabric, path, state, expect):
    """Load `path` into `state` in place; `expect` maps keys of the saved args that must match."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None
    if not isinstance(raw, dict) or "args" not in raw:
        raise UserError(f"{path} is not a checkpoint of this project")
    for key, value in expect.items():
        if raw["args"].get(key) != value:
            raise UserError(f"cannot resume {path}: it was made with {key}={raw['args'].get(key)}, not {value}")
    try:  # read a second time, now by Fabric, into the (possibly distributed) modules
        remainder = fabric.load(path, state)
    except Exception as error:
        raise UserError(f"checkpoint {path} does not fit this run: {type(error).__name__}: {error}") from None
    return remainder


def write_json(path, data):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_csv(path, rows):
    """Rewrite the whole table each time (rows are dicts with the same keys)."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot_curves(path, rows):
    """Every `loss*` column (left) and `top1*` column (right) of the metrics against
    the epoch; returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, prefix, label in zip(axes, ("loss", "top1"), ("training loss", "test top-1 (%)")):
        for column in (c for c in rows[0] if c.startswith(prefix)):
            ax.plot(epochs, [row[column] for row in rows], "--" if "ensemble" in column else "-", label=column)
        ax.set(xlabel="epoch", ylabel=label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
