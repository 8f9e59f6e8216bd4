"""What the four training loops share below the method: the epoch's seed on each
rank, gradient accumulation and clipping, the learning-rate schedules, the log of
a run (TrainLog: the loss terms summed on the device and read every --log-every
steps, the img/s, a stop on NaN, the progress bar and the logger) and a
checkpoint inside an epoch on SIGTERM or Ctrl-C (save_mid_epoch,
resume_mid_epoch).

Used by dml.py, deit.py, takd.py and ktg_ensemble.py. Of a run's `state` (see
common/folder.py) it reads "epoch" and adds "mid_epoch" to a checkpoint saved
inside an epoch: the steps done, every process's log sums and random generators.
"""
import itertools
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.folder import save_checkpoint
from common.launch import UserError


def accumulate(batches, accum_steps, steps):
    """(batch index, optimizer step, whether the batch ends that step, images,
    labels) for the first `steps` × `accum_steps` batches: with gradient
    accumulation, one optimizer step every `accum_steps` batches."""
    for batch, (images, labels) in enumerate(batches):
        step, position = divmod(batch, accum_steps)
        if step == steps:
            return  # too few batches left for another optimizer step
        yield batch, step, position == accum_steps - 1, images, labels


def optimizer_steps(train_loader, accum_steps):
    """The optimizer steps of an epoch: its batches ÷ --grad-accum-steps, one at least."""
    steps = len(train_loader) // accum_steps
    if steps == 0:
        raise UserError(f"--grad-accum-steps {accum_steps} is more than the {len(train_loader)} batches of an epoch")
    return steps


def clip_gradients(fabric, optimizer, modules, max_norm):
    """Clip each module's gradient norm to `max_norm` on its own (a DML student is
    not held back by its peer's gradients). In 16-mixed the gradients are unscaled
    first, once, on the optimizer Fabric's `step` gives the GradScaler (which keys
    its state by that object); a step that overflowed is then skipped by the
    scaler, not raised, and nothing is read on the host."""
    fabric.strategy.precision.unscale_gradients(getattr(optimizer, "optimizer", optimizer))
    for module in modules:
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


def step_schedule(lr, epoch, step, steps_per_epoch, milestones, warmup_epochs):
    """The learning rate of a step schedule, ÷10 at each epoch in `milestones`,
    after a linear warm-up over the first `warmup_epochs`. Stateless: the same
    rate after a resume."""
    done = epoch * steps_per_epoch + step + 1
    warmup = min(1.0, done / max(1.0, warmup_epochs * steps_per_epoch))
    return lr * 0.1 ** sum(epoch >= m for m in milestones) * warmup


def peak_lr(args, batch=512):
    """--lr, given for a batch of `batch`, scaled linearly to the effective batch
    (--batch-size × --grad-accum-steps); a note when --min-lr lies above it (the
    cosine would then stay at the peak)."""
    lr = args.lr * args.batch_size * args.grad_accum_steps / batch
    if args.min_lr > lr:
        print(f"note: --min-lr {args.min_lr:g} is above the peak rate {lr:.3g} (--lr {args.lr:g} at batch {batch}, "
              f"scaled to {args.batch_size * args.grad_accum_steps}): after the warm-up the rate stays at the peak")
    return lr


def cosine_schedule(lr, min_lr, epochs, warmup_epochs, epoch, step, steps_per_epoch):
    """The learning rate of a per-step cosine schedule down to `min_lr`, after a
    linear warm-up from lr/100 over `warmup_epochs` (at most a fifth of the run):
    timm's CosineLRScheduler(warmup_prefix=True, t_in_epochs=False), float for
    float. Stateless: the same rate after a resume."""
    warmup = int(min(warmup_epochs, epochs / 5) * steps_per_epoch)
    start, low = lr / 100, min(min_lr, lr)
    done = epoch * steps_per_epoch + step
    if done < warmup:
        return start + done * ((lr - start) / warmup)
    decay = epochs * steps_per_epoch - warmup
    if done - warmup >= decay:
        return low
    return low + 0.5 * (lr - low) * (1 + math.cos(math.pi * (done - warmup) / decay))


def evaluates_test(epoch, epochs, every):
    """Whether `epoch` (counted from 0) evaluates the test split: every `every`
    epochs and always the last. Test sets larger than a small training epoch
    (CIFAR's 10,000 images against 2,000) would otherwise dominate the run."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def seed_epoch(fabric, seed, epoch):
    """Seed torch, numpy and random for one epoch of this process: drop-path,
    Mixup, CutMix, erasing and the DataLoader workers draw the same after a resume
    as in one go, and differently on each rank (rank 0 as a single process)."""
    from lightning_fabric.utilities.seed import seed_everything

    seed_everything((seed * 1000 + epoch + 1_000_003 * fabric.global_rank) % 2**32, verbose=False)


class TrainLog:
    """The log of a run's training, built once before its loop and kept off the
    GPU's critical path.

    Each step adds its loss terms and a not-finite flag to tensors on the device;
    they are read (one host sync for all ranks) only every --log-every steps and
    at the end of the epoch. A NaN/inf then stops every rank with one line,
    before the next checkpoint: `last.ckpt` stays the last good one. The progress
    bar shows the figures of the last read; without a terminal, each read
    inside the epoch prints one line instead. An epoch's row is reported (printed
    and given to the --logger) by `report`; files are the run folder's to write.
    """

    def __init__(self, fabric, args, out, steps, desc="", preemptible=False):
        """`steps`: the batches of an epoch; `out`: the run folder (None: no logger);
        `desc` names the network in the lines; `preemptible`: SIGTERM or Ctrl-C asks
        the loop to stop at a step (`stopping`, the same on every rank: agreed at a
        read) and save there (save_mid_epoch), a second one stops at once."""
        self.fabric, self.epochs, self.steps, self.log_every = fabric, args.epochs, steps, args.log_every
        self.out, self.name, self.preemptible = out, desc, preemptible
        self.logger_kind, self.logger = args.logger if out is not None else None, None
        self.terminal = sys.stdout.isatty()

    def begin(self, epoch):
        """Start epoch `epoch` (counted from 0): its sums, timer, progress bar and signal handlers."""
        if self.logger is None and self.logger_kind:  # made by the first epoch: a finished run adds no log version
            self.logger = make_logger(self.logger_kind, self.out)
        self.epoch, self.desc = epoch, f"{self.name} epoch {epoch + 1}/{self.epochs}".strip()
        self.names = self.sums = None  # the columns, known from the first step
        self.first_bad_step = torch.full((), -1, device=self.fabric.device)
        self.images, self.done, self.means = 0, 0, {}
        self.bar = tqdm(total=self.steps, desc=self.desc, leave=False,
                        disable=not (self.fabric.is_global_zero and self.terminal))
        self.start = time.perf_counter()
        self.stop_asked = self.stopping = False
        self.handlers = {}
        if self.preemptible and threading.current_thread() is threading.main_thread():
            self.handlers = {sig: signal.signal(sig, self._ask_to_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _ask_to_stop(self, signum, frame):
        if self.stop_asked:
            raise KeyboardInterrupt
        self.stop_asked = True

    def step(self, step, loss, terms, batch_size, **diagnostics):
        """Add one step of `batch_size` images on this rank: the `loss` that was
        backpropagated (column `loss`), its named `terms` (`loss_<name>`, which sum
        to it) and other per-step figures (`diagnostics`, by their names)."""
        columns = {"loss": loss, **{f"loss_{name}": term for name, term in terms.items()}, **diagnostics}
        if self.names is None:
            self.names = list(columns)
            self.sums = torch.zeros(len(columns), device=self.fabric.device)
        values = torch.stack([value.detach().float() for value in columns.values()])
        self.sums += values
        bad = ~torch.isfinite(values).all()
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)
        self.images += batch_size * self.fabric.world_size
        self.bar.update()
        if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
            self.read(step + 1)
        elif self.fabric.world_size == 1:
            self.stopping = self.stop_asked  # nothing to agree on

    def read(self, done):
        """The one sync: the mean terms so far over all ranks, whether any went bad, whether any was asked to stop."""
        flags = torch.tensor([self.stop_asked], dtype=torch.float32, device=self.sums.device)
        packed = torch.cat([self.sums / done, flags, (self.first_bad_step >= 0).float()[None]])
        packed = self.fabric.all_reduce(packed, reduce_op="mean").tolist()
        self.stopping = packed[-2] > 0
        if packed[-1] > 0:  # on some rank
            first = int(self.first_bad_step)
            where = f"step {first + 1}" if first >= 0 else f"by step {done} (on another process)"
            last = Path(self.out or "") / "last.ckpt"
            kept = f"; the last good checkpoint is {last}" if self.out is not None and last.is_file() else ""
            raise UserError(f"the loss became NaN or infinite at epoch {self.epoch + 1}, {where}: stopped{kept}")
        self.means, self.done = dict(zip(self.names, packed[:-2])), done
        self.seconds = time.perf_counter() - self.start
        if self.logger is not None:
            self.logger.log_metrics({f"train/{name}": value for name, value in self.means.items()}
                                    | {"train/img_per_s": self.img_per_s}, step=self.epoch * self.steps + done)
        figures = {name: f"{value:.3f}" for name, value in self.means.items()} | {"img_s": f"{self.img_per_s:.0f}"}
        if self.terminal:
            self.bar.set_postfix(figures)
        elif done < self.steps:
            self.fabric.print(f"{self.desc} step {done}/{self.steps}: "
                              + " ".join(f"{name}={value}" for name, value in figures.items()))

    @property
    def img_per_s(self):
        return self.images / max(self.seconds, 1e-9)

    def end(self):
        """End of the epoch's steps: the mean of every column over the epoch, and img/s."""
        if not self.means and self.names is not None:  # resumed after the epoch's last step: nothing read since
            self.read(self.done)
        self.bar.close()
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        if self.stop_asked and not self.stopping:  # asked after the epoch's last step: stop as before
            signal.raise_signal(signal.SIGTERM)
        return {**self.means, "img_per_s": self.img_per_s}

    def elapsed(self):
        """Seconds since the epoch began (its part before a mid-epoch resume included)."""
        return time.perf_counter() - self.start

    def report(self, row):
        """Print the epoch's `row` (its accuracies and losses, img/s) and give it to the logger."""
        shown = [f"{key}={value:.2f}" for key, value in row.items()
                 if key.startswith(("top1", "val_top1")) and value is not None]
        shown += [f"{key}={value:.3f}" for key, value in row.items() if key.startswith("loss") and value is not None]
        self.fabric.print(f"{self.desc}: " + " ".join(shown) + f" {row['img_per_s']:.0f} img/s")
        if self.logger is not None:
            self.logger.log_metrics({f"epoch/{key}": value for key, value in row.items()
                                     if isinstance(value, (int, float))}, step=row["epoch"] * self.steps)
            self.logger.save()

    def state(self):
        """What a mid-epoch checkpoint keeps of the log: this process's sums so far (tensors), and the counts."""
        return ({"log_sums": self.sums, "log_first_bad_step": self.first_bad_step},
                {"images": self.images, "seconds": time.perf_counter() - self.start, "log_names": self.names})

    def load(self, tensors, counts, done):
        """Continue from what state() returned, after `done` steps of the epoch."""
        self.names, self.sums, self.done = counts["log_names"], tensors["log_sums"].clone(), done
        self.first_bad_step.copy_(tensors["log_first_bad_step"])
        self.images, self.start = counts["images"], time.perf_counter() - counts["seconds"]
        self.bar.update(done)


def make_logger(kind, out):
    """Fabric's CSV (`logs/version_<n>/metrics.csv`, a new version for each
    resumed session, so none overwrites another) or TensorBoard (`tensorboard/`,
    which appends) logger in the run folder."""
    from lightning_fabric.loggers import CSVLogger, TensorBoardLogger

    if kind == "tensorboard":
        return TensorBoardLogger(root_dir=out, name="tensorboard", version="")
    return CSVLogger(root_dir=out, name="logs")


# --- preemption: a checkpoint inside an epoch ---------------------------------


def save_mid_epoch(fabric, out, state, step, log):
    """SIGTERM or Ctrl-C inside an epoch (a cluster's preemption), at the end of
    optimizer step `step`: `last.ckpt` with the epoch's progress (its steps, every
    process's log sums and random generators), then stop as an interrupt does.
    `--resume` goes on from that step exactly (resume_mid_epoch)."""
    tensors, counts = log.state()
    per_process = fabric.all_gather({**tensors, **rng_state(fabric.device)})  # [world size, ...] each
    progress = {"steps": step, "per_process": per_process, **counts}
    save_checkpoint(fabric, out / "last.ckpt", {**state, "mid_epoch": progress})
    fabric.print(f"stopped at epoch {state['epoch'] + 1}, step {step}: saved {out / 'last.ckpt'}")
    raise KeyboardInterrupt


def resume_mid_epoch(fabric, state, batches, log, accum_steps):
    """After save_mid_epoch: draw the epoch's first batches again without training
    on them (the data pipeline's generators advance as they did), then restore this
    process's log sums and random generators as they were at the save."""
    progress = state.pop("mid_epoch", None)
    if progress is None:
        return
    fabric.print(f"going on from step {progress['steps']} of epoch {state['epoch'] + 1}")
    for _ in itertools.islice(batches, progress["steps"] * accum_steps):
        pass
    # a copy of this process's row (torch's set_rng_state reads a view's storage from its start)
    mine = {key: (value[fabric.global_rank] if fabric.world_size > 1 else value).clone()
            for key, value in progress["per_process"].items()}
    log.load(mine, progress, progress["steps"] * accum_steps)
    set_rng_state(mine)


def rng_state(device):
    """torch's, numpy's, Python's (and the GPU's) generators of this process, as tensors (gathered across ranks)."""
    import random

    import numpy as np

    _, keys, position, has_gauss, gauss = np.random.get_state()
    _, words, python_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": torch.tensor([*keys.tolist(), position, has_gauss]),
             "python": torch.tensor(words), "gauss": torch.tensor([gauss, math.nan if python_gauss is None
                                                                   else python_gauss], dtype=torch.float64)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return {key: value.to(device) for key, value in state.items()}


def set_rng_state(state):
    import random

    import numpy as np

    torch.set_rng_state(state["torch"].cpu())
    numpy = state["numpy"].tolist()
    numpy_gauss, python_gauss = state["gauss"].tolist()
    np.random.set_state(("MT19937", np.array(numpy[:624], dtype=np.uint32), numpy[624], numpy[625], numpy_gauss))
    random.setstate((3, tuple(state["python"].tolist()), None if math.isnan(python_gauss) else python_gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu())
