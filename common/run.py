"""Run folders, checkpoints and the one-line error every script ends with on bad input.

A run folder holds `args.json`, `metrics.csv`, `results.json`, `last.ckpt`,
`best.ckpt`, plots (PNG, each with its data in a CSV), the trained weights as
safetensors and `logs/`. Checkpoints, tables and plots are written to a
temporary file and renamed, so a kill at any moment leaves the last good one.
"""
import argparse
import csv
import itertools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from lightning_fabric import Fabric
from lightning_fabric.connector import _is_using_cli
from tqdm import tqdm


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default once: none for flags without one, and none
    added where the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_with_config(parser, argv=None, script=None):
    """Parse the command line. `--config RUN/args.json`, or a checkpoint given to
    `--eval`, supplies that run's arguments as defaults; flags on the command
    line override them. `script` (e.g. "dml") is recorded in the arguments, so in
    args.json and every checkpoint: a run's file given to another script is refused."""
    args = parser.parse_args(argv)
    saved, source = None, None

    def fail(message):  # a bad file, not a bad command line: one line, without argparse's usage block
        parser.exit(2, f"error: {message}\n")

    def require_file(source, path):
        if not Path(path).is_file():
            fail(f"{source}: {'not a file' if Path(path).exists() else 'no such file'}")

    if getattr(args, "eval", None):  # read, and its script checked, under --config too
        source = f"--eval {args.eval}"
        require_file(source, args.eval)
        try:
            saved = torch.load(args.eval, map_location="cpu", weights_only=True)["args"]
        except Exception as error:
            fail(f"{source}: cannot read it as a checkpoint of this project ({type(error).__name__})")
        check_script(saved.get("script"), script, source, fail)
    if getattr(args, "config", None):  # its arguments, rather than the checkpoint's
        source = f"--config {args.config}"
        require_file(source, args.config)
        try:
            saved = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as error:
            fail(f"{source}: cannot read it as JSON ({type(error).__name__})")
        if not isinstance(saved, dict):
            fail(f"{source}: not a JSON object of flags")
    if saved is not None:
        check_script(saved.get("script"), script, source, fail)
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(saved) - set(actions) - {"script"})
        if unknown:
            fail(f"{source}: {', '.join(unknown)} is not a flag of this script")
        if not set(saved) - {"script"}:
            fail(f"{source} holds no flags: give a run's args.json")
        parser.set_defaults(**{key: _saved_value(actions[key], value, source, fail)
                               for key, value in saved.items()
                               if key in actions and key not in ("out", "resume", "extend", "overwrite", "config",
                                                                 "eval")})
        args = parser.parse_args(argv)
        if source.startswith("--eval"):  # the checkpoint is evaluated as it was trained
            ignored = [key for key, value in saved.items() if key in actions and key not in EVAL_MAY_CHANGE
                       and getattr(args, key) != value]
            for key in ignored:
                setattr(args, key, saved[key])
            if ignored:
                print(f"note: --eval evaluates {args.eval} as it was trained: "
                      f"{' '.join('--' + key.replace('_', '-') for key in ignored)} "
                      f"{'has' if len(ignored) == 1 else 'have'} no effect")
    if script is not None:
        args.script = script
    return args


def _saved_value(action, value, source, fail):
    """`value` of a run's file for the flag `action`, checked (type, choices, one or a list) as argparse checks
    the command line: `fail` with one line naming the file and the flag otherwise."""
    flag = f"{source}: {action.option_strings[0] if action.option_strings else action.dest}"
    if value is None:
        if action.default is not None:  # null only where the flag may be left out (its default is None)
            fail(f"{flag} cannot be null: give a value or leave the key out")
        return None
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            fail(f"{flag} must be true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many != isinstance(value, list) or isinstance(value, dict):
        fail(f"{flag} must be {'a list' if many else 'one value'}, got {value!r}")
    checked = []
    for item in value if many else [value]:
        try:
            item = (action.type or str)(str(item))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            fail(f"{flag}: invalid {getattr(action.type, '__name__', 'str')} value {item!r}")
        if action.choices is not None and item not in action.choices:
            fail(f"{flag}: invalid choice {item!r} (choose from {', '.join(map(str, action.choices))})")
        checked.append(item)
    return checked if many else checked[0]


def check_script(made_by, script, source, fail):
    """Call `fail` with one line when a run's file (`source`) was made by another script."""
    if made_by is not None and script is not None and made_by != script:
        fail(f"{source} was made by {made_by}.py, not {script}.py: give it to {made_by}.py")


def make_logger(kind, out):
    """Fabric's CSV (`logs/version_<n>/metrics.csv`, a new version for each
    resumed session, so none overwrites another) or TensorBoard (`tensorboard/`,
    which appends) logger in the run folder."""
    from lightning_fabric.loggers import CSVLogger, TensorBoardLogger

    if kind == "tensorboard":
        return TensorBoardLogger(root_dir=out, name="tensorboard", version="")
    return CSVLogger(root_dir=out, name="logs")


class UserError(Exception):
    """Bad input: the scripts print its message as one line and exit with status 2."""


def exit_on_user_error(main, args):
    """Run `main(args)`; a UserError becomes one line on stderr and exit status 2,
    Ctrl-C or SIGTERM (a cluster's preemption) one line and status 130."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main(args)
    except UserError as error:
        # A UserError raised in a DataLoader worker arrives wrapped with its
        # traceback; its last line is the message.
        message = str(error).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        done = "its finished trials" if getattr(args, "search", None) else "its last checkpoint"
        kept = f": --resume --out {out} continues from {done}" if out else ""
        if out and not hasattr(args, "resume"):  # reproduce.py: its finished runs are kept, the killed one resumes
            kept = ": the same command again continues it"
        print(f"interrupted{kept}", file=sys.stderr)
        sys.exit(130)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def default_precision():
    """bf16-mixed where the hardware computes in bf16 natively, else 16-mixed on GPUs
    (V100, T4: their bf16 is emulated, and slow) and full precision on CPUs."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "32-true"
    return "bf16-mixed" if " avx512_bf16" in flags or " amx_bf16" in flags else "32-true"


def make_fabric():
    """A launched Fabric. Devices, strategy and precision come from `fabric run`
    flags when given; plain `python script.py` runs on one device (not every GPU
    of the host) with `default_precision()`."""
    precision = None if "LT_PRECISION" in os.environ else default_precision()
    if _is_using_cli():  # under `fabric run` the processes exist already
        fabric = Fabric(precision=precision)
    else:
        fabric = Fabric(devices=1, precision=precision)
        fabric.launch()
    if fabric.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls in 32-true runs
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: tune the convolutions once
    return fabric


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


def no_backward_sync(fabric, modules, enabled):
    """Fabric's no_backward_sync for several modules: skip DDP's gradient
    all-reduce in the backward of a batch that only accumulates."""
    import contextlib

    stack = contextlib.ExitStack()
    for module in modules:
        stack.enter_context(fabric.no_backward_sync(module, enabled=enabled))
    return stack


def clip_gradients(fabric, optimizer, modules, max_norm):
    """Clip each module's gradient norm to `max_norm` on its own (a DML student is
    not held back by its peer's gradients). In 16-mixed the gradients are unscaled
    first, once, on the optimizer Fabric's `step` gives the GradScaler (which keys
    its state by that object); a step that overflowed is then skipped by the
    scaler, not raised, and nothing is read on the host."""
    fabric.strategy.precision.unscale_gradients(getattr(optimizer, "optimizer", optimizer))
    for module in modules:
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


def inference_dtype(fabric):
    """The dtype a frozen teacher is held in: that of the run's autocast (bf16 or
    float16), float32 in a full-precision run."""
    precision = str(fabric.strategy.precision.precision)
    return torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else torch.float32


def on_rank_zero(fabric, value):
    """Rank 0's `value` on every process: a decision made from files (does a
    checkpoint exist?) is the same everywhere, even without a shared file system."""
    return fabric.broadcast(value) if fabric.world_size > 1 else value


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
    """The bookkeeping of one training epoch, kept off the GPU's critical path.

    Each step adds its loss terms and a not-finite flag to tensors on the device;
    they are read (one host sync for all ranks) only every `log_every` steps and
    at the end of the epoch. A NaN/inf then stops every rank with one line,
    before the next checkpoint: `last.ckpt` stays the last good one. The progress
    bar shows the figures of the last read; without a terminal, each read
    inside the epoch prints one line instead.
    """

    def __init__(self, fabric, epoch, epochs, steps, log_every, out, desc="", logger=None, preemptible=False):
        self.fabric, self.epoch, self.steps, self.log_every = fabric, epoch, steps, log_every
        self.logger = logger
        self.out, self.desc = out, f"{desc} epoch {epoch + 1}/{epochs}".strip()
        self.names = self.sums = None  # the columns, known from the first step
        self.first_bad_step = torch.full((), -1, device=fabric.device)
        self.images, self.done, self.means = 0, 0, {}
        self.terminal = sys.stdout.isatty()
        self.bar = tqdm(total=steps, desc=self.desc, leave=False, disable=not (fabric.is_global_zero and self.terminal))
        self.start = time.perf_counter()
        # preemptible: SIGTERM or Ctrl-C asks the loop to stop at a step (`stopping`, the same on every
        # rank: agreed at a read) and save there (save_mid_epoch); a second one stops at once
        self.stop_asked = self.stopping = False
        self.handlers = {}
        if preemptible and threading.current_thread() is threading.main_thread():
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

    def close(self):
        """End of the epoch: the mean of every column over the epoch, and img/s."""
        if not self.means and self.names is not None:  # resumed after the epoch's last step: nothing read since
            self.read(self.done)
        self.bar.close()
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        if self.stop_asked and not self.stopping:  # asked after the epoch's last step: stop as before
            signal.raise_signal(signal.SIGTERM)
        return {**self.means, "img_per_s": self.img_per_s}

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


def end_epoch(fabric, out, state, row, score, log, panels):
    """Record the epoch's `row` in `state["history"]` and its time, print it, and
    save the run (`save_epoch`; `score` chooses best.ckpt, `panels` the curves)."""
    state["history"].append(row)
    state["epoch"] = row["epoch"]
    state["wall_s"] += time.perf_counter() - log.start
    shown = [f"{key}={value:.2f}" for key, value in row.items()
             if key.startswith(("top1", "val_top1")) and value is not None]
    shown += [f"{key}={value:.3f}" for key, value in row.items() if key.startswith("loss") and value is not None]
    fabric.print(f"{log.desc}: " + " ".join(shown) + f" {row['img_per_s']:.0f} img/s")
    if log.logger is not None:
        log.logger.log_metrics({f"epoch/{key}": value for key, value in row.items() if isinstance(value, (int, float))},
                               step=row["epoch"] * log.steps)
        log.logger.save()
    save_epoch(fabric, out, state, score, panels)


def check_fraction(name, value, high_included=False):
    if value is not None and not (0 <= value <= 1 if high_included else 0 <= value < 1):
        raise UserError(f"--{name.replace('_', '-')} must lie in [0, 1{']' if high_included else ')'}, got {value}")


def check_shared_flags(args):
    """One line for a bad value of a flag the scripts share (those `args` has)."""
    flag = lambda name: getattr(args, name, None)
    for name, value in vars(args).items():  # NaN passes every comparison, and inf is no rate or weight
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("seed", "split_seed", "warmup_epochs", "weight_decay", "mixup", "cutmix", "workers", "min_lr"):
        if flag(name) is not None and flag(name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {flag(name)}")
    for name in ("seed", "split_seed"):
        if flag(name) is not None and flag(name) >= 2**32:
            raise UserError(f"--{name.replace('_', '-')} must be below 2**32, got {flag(name)}")
    for name in ("val_split", "smoothing", "drop_path", "model_ema_decay"):
        check_fraction(name, flag(name))
    check_fraction("reprob", flag("reprob"), high_included=True)
    require_positive(**{name: flag(name) for name in ("epochs", "batch_size", "lr", "img_size", "patch_size",
                                                        "log_every", "eval_every", "grad_accum_steps", "clip_grad",
                                                        "train_subset")})
    if flag("out") == "":
        raise UserError("--out is empty: give a folder, or leave --out out for runs/<script>/<date-time>")
    for name in ("teacher_ckpt", "pretrained"):  # before any training: a late typo would cost the run before it
        for path in (flag(name) if isinstance(flag(name), list) else [flag(name)] if flag(name) else []):
            if not Path(path).is_file():
                what = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
                raise UserError(f"--{name.replace('_', '-')} {path} {what}")
    if flag("resume") and not flag("out"):
        raise UserError("--resume needs --out, the run folder to continue")
    if flag("extend") and not flag("resume"):
        raise UserError("--extend goes with --resume (and a larger --epochs): it trains an existing run on")


def require_positive(**values):
    for name, value in values.items():
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


RUN_MARKER = ".kd_run"  # in every run folder: only such a folder is ever replaced by --overwrite
EVAL_RESULTS = "eval.json"  # what --eval writes into --out: a run's results.json is never replaced by it


def start_run(args, script, marker="last.ckpt"):
    """A run's start, the same in every script once its flags are checked: Fabric
    launched and seeded, and the run folder opened (open_run_folder; by default
    runs/<script>/<date-time>, the same on every process). Returns (fabric, out)."""
    from datetime import datetime

    fabric = make_fabric()
    fabric.seed_everything(args.seed)
    folder = script.removesuffix("_ensemble")
    args.out = args.out or fabric.broadcast(f"runs/{folder}/{datetime.now():%Y%m%d-%H%M%S}")
    return fabric, open_run_folder(fabric, args, script, marker)


def open_run_folder(fabric, args, script, marker="last.ckpt"):
    """Check `args.out` and return it as a Path, made and marked as a run folder
    of `script` (`RUN_MARKER`). A non-empty folder is refused unless resuming
    (which needs the file `marker`) or overwriting; --overwrite replaces only a
    folder with our marker, never the working directory, one of its parents or
    the home folder. A run killed before its first checkpoint is started afresh
    by --resume when asked with the same arguments (`args.resume` turns False).
    Rank 0 decides from its files and every process follows (no shared file
    system needed to agree); then rank 0 changes the folder."""
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if getattr(args, "eval", None) and (args.resume or args.overwrite):
        raise UserError(f"--eval writes {EVAL_RESULTS} into --out and never replaces or continues a run: "
                        f"leave out --{'resume' if args.resume else 'overwrite'}")
    error, replace, afresh = on_rank_zero(fabric, _check_run_folder(out, args, marker) if fabric.is_global_zero
                                          else None)
    if error:
        raise UserError(error)
    if afresh:
        fabric.print(f"--resume: {out} has no {marker} yet, so the run starts afresh with the same arguments")
        args.resume = False
    if fabric.is_global_zero:
        if replace:
            shutil.rmtree(out)
        fresh = not out.is_dir() or not any(out.iterdir())  # --eval marks only a folder it made
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_MARKER).is_file() and (fresh or not getattr(args, "eval", None)):
            write_json(out / RUN_MARKER, {"script": script})
    fabric.barrier()
    return out


def _check_run_folder(out, args, marker):
    """open_run_folder's decision: (the error, or None; whether to delete `out` first; whether to start afresh)."""
    for above in (out, *out.parents):
        if above.exists() and not above.is_dir():
            return f"--out {out}: {above} is a file, not a folder", False, False
    exists = out.is_dir() and any(path.name != RUN_MARKER for path in out.iterdir())  # a run's files
    writable = next(path for path in (out, *out.parents) if path.exists())
    if not os.access(writable, os.W_OK | os.X_OK):
        return f"--out {out}: {writable} is not writable", False, False
    if getattr(args, "eval", None):  # it adds EVAL_RESULTS to whatever folder --out is, and deletes nothing
        if (out / EVAL_RESULTS).exists() and not (out / RUN_MARKER).is_file():
            return (f"--eval: {out / EVAL_RESULTS} exists and {out} is not a run folder of this project: give "
                    f"another --out"), False, False
        return _make_folder(out), False, False
    if args.resume and (out / "args.json").is_file():
        changed = _resume_changes(out, args)
        if changed:
            return changed, False, False
    if args.resume and not (out / marker).is_file():
        if not (out / "args.json").is_file():  # its arguments, when it has them, were checked above
            return f"--resume: no {out / marker} to resume from", False, False
        return None, False, True  # keep its files: args.json is rewritten, the rest is replaced as the run goes
    if exists and not (args.resume or args.overwrite):
        if not (out / RUN_MARKER).is_file():
            return (f"--out {out} exists, is not empty and is not a run folder of this project (it has no "
                    f"{RUN_MARKER}): give another --out"), False, False
        return f"run folder {out} exists and is not empty: pass --resume or --overwrite, or another --out", False, False
    if exists and args.overwrite:
        if out.is_symlink():
            return (f"--overwrite: {out} is a link to {out.resolve()}; nothing was deleted: give the folder itself "
                    f"or another --out"), False, False
        precious = [Path.cwd(), *Path.cwd().parents, Path.home()]
        if out.resolve() in {path.resolve() for path in precious}:
            return (f"--overwrite would delete {out}, the working directory, a folder above it or the home folder: "
                    f"give another --out"), False, False
        if not (out / RUN_MARKER).is_file():
            return (f"--overwrite: {out} is not a run folder of this project (it has no {RUN_MARKER}), so nothing "
                    f"was deleted: give another --out"), False, False
        made_by, script = _made_by(out), getattr(args, "script", None)
        if made_by and script and made_by != script:
            return (f"--overwrite: {out} is a run of {made_by}.py, and {script}.py replaces only its own runs: "
                    f"nothing was deleted; give another --out"), False, False
    return _make_folder(out), exists and args.overwrite, False


def _make_folder(out):
    """Make `out` (a folder that cannot be made, under /proc say, stops every process); the line saying why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"--out {out}: cannot make this folder ({error.strerror})"


def _resume_changes(out, args):
    """None when `args` may resume the run in `out` (by its args.json), else the line that refuses them:
    checked before anything in the folder is written."""
    try:
        made = json.loads((out / "args.json").read_text())
    except (OSError, ValueError) as error:
        return f"--resume: cannot read {out / 'args.json'} ({type(error).__name__})"
    if not isinstance(made, dict):
        return f"--resume: {out / 'args.json'} is not a JSON object of flags"
    asked = {key: value for key, value in vars(args).items() if value is not None}  # None: filled in by the run
    wrong_script = []
    check_script(made.get("script"), asked.get("script"), f"run folder {out}", wrong_script.append)
    return wrong_script[0] if wrong_script else resume_refusal(out, made, asked)


def _made_by(out):
    """The script whose run folder `out` is (its RUN_MARKER says), or None."""
    try:
        return json.loads((out / RUN_MARKER).read_text()).get("script")
    except (OSError, ValueError, AttributeError):
        return None


def resume_refusal(source, made, asked):
    """None when a run `made` with these arguments may go on with those `asked`, else the line that refuses."""
    if asked.get("extend") and not asked.get("epochs", 0) > made.get("epochs", 0):
        return f"--extend {source}: give --epochs above the {made.get('epochs')} it was made with"
    changed = run_shaping_changes(made, asked)
    if not changed:
        return None
    was = ", ".join(f"--{key.replace('_', '-')} {made.get(key)} (now {asked[key]})" for key in changed)
    return (f"cannot resume {source}: it was made with {was}; a resumed run may change only logging, workers and "
            f"--compile")


def save_checkpoint(fabric, path, state):
    """Write through a temporary file and rename: never a half-written checkpoint,
    and never one whose weights are NaN or infinite (the run stops instead, and
    the checkpoint before stays the last good one)."""
    path = Path(path)
    if not finite_weights(fabric, state):
        kept = f"the last good checkpoint is {path}" if path.is_file() else f"no checkpoint was written to {path}"
        raise UserError(f"the weights became NaN or infinite by epoch {state.get('epoch')}: stopped; {kept}")
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, with_loss_scale(fabric, state))
    if fabric.is_global_zero:
        os.replace(tmp, path)
    fabric.barrier()


def with_loss_scale(fabric, state):
    """`state` and, in 16-mixed, the GradScaler (its scale and growth tracker), so
    that a resumed run goes on with the scale it had, as an uninterrupted one."""
    if getattr(fabric.strategy.precision, "scaler", None) is None:
        return state
    return {**state, "loss_scale": fabric.strategy.precision}


def finite_weights(fabric, state):
    """Whether every parameter and buffer of the modules in `state` is finite, on every process (one host sync)."""
    bad = torch.zeros((), device=fabric.device)
    for module in state.values():
        if isinstance(module, torch.nn.Module):
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.is_floating_point():
                    bad += (~torch.isfinite(tensor)).sum().to(bad.device)
    return fabric.all_reduce(bad, reduce_op="sum").item() == 0


# Drawing curves.png takes about half a second, a third of an epoch of 1,000
# images: it is redrawn at most this often, and after the last epoch.
CURVES_EVERY_S = 30.0


def save_epoch(fabric, out, state, top1, panels):
    """End of an epoch: `last.ckpt`, `best.ckpt` if `top1` is the best so far
    (None: an epoch that did not evaluate, never the best; the same file, linked,
    not written twice), `metrics.csv` and, now and then, `curves.png` (its
    `panels`, see plot_curves) from `state["history"]`."""
    is_best = top1 is not None and top1 > state["best_top1"]
    if is_best:
        state["best_top1"], state["best_epoch"] = top1, state["epoch"]
    save_checkpoint(fabric, out / "last.ckpt", state)
    if fabric.is_global_zero:
        if is_best:
            same_file(out / "last.ckpt", out / "best.ckpt")
        write_csv(out / "metrics.csv", state["history"])
        curves = out / "curves.png"
        due = not curves.is_file() or time.time() - curves.stat().st_mtime >= CURVES_EVERY_S
        if due or state["epoch"] >= state["args"]["epochs"]:
            plot_curves(curves, state["history"], panels)


def same_file(source, path):
    """Make `path` hold what `source` holds, atomically: a hard link (the next
    last.ckpt is a new file, so the link keeps this one), or a copy where the file
    system has no links."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def add_run_flags(parser, folder, compiled, extend=False):
    """The flags of a run's plumbing, the same in every script: where it is
    written, how it is resumed, logged and evaluated, how fast it runs (all of
    them but --overwrite and --eval may change on --resume: RESUMABLE). `folder`
    names the default run folder, `compiled` what --compile wraps; `extend` adds
    --extend (a run trained on to a larger --epochs)."""
    parser.add_argument("--out", help=f"run folder (default: runs/{folder}/<date-time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    if extend:
        parser.add_argument("--extend", action="store_true",
                            help="with --resume and a larger --epochs: train the run on, its learning-rate schedule "
                                 "stretched to the new length (the rate rises again)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing --out (a run folder) first")
    parser.add_argument("--eval", help="evaluate this checkpoint (with its run's arguments) instead of training")
    parser.add_argument("--config", help="start from a run's args.json; flags given here override it")
    parser.add_argument("--logger", choices=["csv", "tensorboard"], default="csv",
                        help="also log steps and epochs to logs/version_<n>/metrics.csv or tensorboard/")
    parser.add_argument("--log-every", type=int, default=50, help="read the losses (a host sync) every N steps")
    parser.add_argument("--workers", type=int, help="DataLoader workers for streamed data and per-image transforms "
                                                    "(default: this process's cores shared by the ranks on the "
                                                    "machine, at most 8)")
    parser.add_argument("--compile", action="store_true", help=f"wrap {compiled} in torch.compile")


# What --eval may change besides: the data it is evaluated on and how fast.
EVAL_MAY_CHANGE = {"out", "resume", "overwrite", "log_every", "workers", "compile", "data_dir", "logger", "config",
                   "eval", "extend", "script", "dataset", "img_size", "batch_size", "train_subset", "split_seed",
                   "val_split", "model_module"}

# What --resume may change: nothing that shapes the run (models, data, epochs,
# batch size, learning rate and schedule, seed, losses), only where it is
# written, how it is logged and how fast it runs.
RESUMABLE = {"out", "resume", "overwrite", "log_every", "workers", "compile", "data_dir", "logger", "config", "eval",
             "heartbeat_grace", "extend", "script"}  # the script is checked on its own (check_script)


def run_shaping_changes(made, asked):
    """The arguments in `asked` that differ from those a run was `made` with, leaving
    out what a resumed run may change (RESUMABLE) and flags added to the script
    after the run was made (it ran with their default). With --extend, --epochs may grow."""
    extended = asked.get("extend") and asked.get("epochs", 0) > made.get("epochs", 0)
    return [key for key, value in asked.items() if key not in RESUMABLE and key in made and made[key] != value
            and not (extended and key == "epochs")]


def resume_or_record(fabric, out, state, args):
    """--resume: load `out`/last.ckpt into `state` (load_checkpoint); a new run:
    write args.json. Then `state["args"]` (saved in every checkpoint) holds these arguments."""
    if args.resume:
        load_checkpoint(fabric, out / "last.ckpt", state, args)
        fabric.print(f"resuming {out} at epoch {state['epoch']}")
    elif fabric.is_global_zero:
        write_json(out / "args.json", vars(args))
    state["args"] = vars(args)


def load_checkpoint(fabric, path, state, args):
    """Load `path` into `state` in place; refuse a checkpoint made with other run-shaping `args`.
    With --extend, the run goes on to the larger --epochs on the schedule of a run
    of that length (recorded in `state["extended_from"]`, and args.json rewritten)."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None
    if not isinstance(raw, dict) or "args" not in raw:
        raise UserError(f"{path} is not a checkpoint of this project")
    check_script(raw["args"].get("script"), getattr(args, "script", None), f"checkpoint {path}", _fail)
    refusal = resume_refusal(path, raw["args"], vars(args))
    if refusal:
        raise UserError(refusal)
    try:  # read a second time, now by Fabric, into the (possibly distributed) modules
        target = with_loss_scale(fabric, state) if "loss_scale" in raw else state
        remainder = fabric.load(path, target, weights_only=True)
    except Exception as error:
        raise UserError(f"checkpoint {path} does not fit this run: {type(error).__name__}: {error}") from None
    if not finite_weights(fabric, state):
        raise UserError(f"checkpoint {path} holds NaN or infinite weights: not resumed")
    remainder.pop("loss_scale", None)  # of a 16-mixed run resumed in another precision
    if target is not state:  # Fabric set the plain values (epoch, history) in the dict it was given
        state.update({key: value for key, value in target.items() if key != "loss_scale"})
    state.update(remainder)  # plain values a script does not ask for by name, such as best_epoch
    made = raw["args"]["epochs"]
    if getattr(args, "extend", False) and made != args.epochs:
        state["extended_from"] = [*state.get("extended_from", []), made]
        fabric.print(f"--extend: {path.parent} goes on from epoch {state['epoch']} to {args.epochs} (made for {made}), "
                     f"its learning rate now on the schedule of a {args.epochs}-epoch run")
        if fabric.is_global_zero:
            write_json(path.parent / "args.json", vars(args))
    return remainder


def run_fields(fabric, args, method):
    """The fields every results.json starts with: what ran, on what, and how."""
    return {"method": method, "dataset": args.dataset, "epochs": args.epochs, "seed": args.seed,
            "best_on": "validation" if args.val_split else "test",
            "precision": str(fabric.strategy.precision.precision), "world_size": fabric.world_size}


def best_epoch(state):
    """results.json's record of the epoch best.ckpt holds: its number and its row's accuracies."""
    epoch = state.get("best_epoch")
    row = next((row for row in state["history"] if row["epoch"] == epoch), {})
    return {"epoch": epoch, **{key: value for key, value in row.items() if "top1" in key}}


def load_for_eval(fabric, path, state):
    """--eval: load every module of `state` from `path` strictly: a checkpoint
    whose networks differ is refused, never evaluated half-loaded."""
    try:
        rest = fabric.load(path, state, strict=True, weights_only=True)
    except Exception as error:
        raise UserError(f"checkpoint {path} does not fit these networks: {type(error).__name__}: "
                        f"{' '.join(str(error).split())[:200]}") from None
    if not finite_weights(fabric, state):
        raise UserError(f"checkpoint {path} holds NaN or infinite weights: not evaluated")
    if "mid_epoch" in rest:
        fabric.print(f"note: {path} was saved by a run stopped at step {rest['mid_epoch']['steps']} of epoch "
                     f"{state['epoch'] + 1}: these are its weights from inside that epoch")


def _fail(message):
    raise UserError(message)


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


def plot_curves(path, rows, panels):
    """The metrics against the epoch, one panel per `(title, [(column, label), ...])`
    of `panels`; markers show every epoch (a one-epoch run too). A validation
    column is dotted with open markers, in the colour of its test column; an
    ensemble is drawn thicker. A line given as `(column, label, "right")` gets
    the panel's right axis (DML's KL, ≈ 0.01 beside a CE of ≈ 2). Columns a run
    lacks are left out; a column's empty values (epochs that did not evaluate,
    `--eval-every`) are skipped. A loss column (`loss`, `loss_<term>`) no panel
    names joins the first panel: a term added to a method's loss is drawn too.
    Returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    named = {column for _, lines in panels for column, *_ in lines}
    unnamed = [(column, column) for column in rows[-1] if column.startswith("loss") and column not in named]
    panels = [(panels[0][0], [*panels[0][1], *unnamed]), *panels[1:]]
    epochs = [int(row["epoch"]) for row in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, layout="constrained")
    for ax, (title, lines) in zip(axes[0], panels):
        right, colours = None, {}
        for column, label, *side in lines:
            points = [(epoch, float(row[column])) for epoch, row in zip(epochs, rows)
                      if row.get(column) not in (None, "")]
            if not points:
                continue
            if side and right is None:
                right = ax.twinx()
            colour = colours.setdefault(column.removeprefix("val_"), f"C{len(colours)}")
            validation = column.startswith("val_")
            (right if side else ax).plot(
                *zip(*points), ":" if validation else "-", marker="s" if validation else "o", markersize=3,
                markerfacecolor="none" if validation else colour, color=colour,
                linewidth=2.5 if "ensemble" in column else 1.2, label=f"{label} (right axis)" if side else label)
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = [line for axis in (ax, right) if axis is not None for line in axis.get_lines()]
        if handles:
            ax.legend(handles=handles, fontsize=8)
    save_figure(fig, path)
    return fig


def save_figure(fig, path):
    """Write a figure through a temporary file: a kill never leaves half a PNG."""
    import matplotlib.pyplot as plt

    tmp = Path(str(path) + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
    plt.close(fig)
