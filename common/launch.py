"""A run's command line and launch, the same in the four scripts.

The plumbing flags (add_run_flags) beside the rule of which of them a resumed
run may change (RESUMABLE, resume_refusal) and which --eval ignores
(EVAL_MAY_CHANGE); --config and --eval files read as flags (parse_with_config);
the checks of the flags the scripts share; the one line that bad input gets
(UserError, exit_on_user_error); Fabric (make_fabric, default_precision,
finish) and decisions made on rank 0 (on_rank_zero).

Used by dml.py, deit.py, takd.py, ktg_ensemble.py, reproduce.py and bench.py;
every module of common/ raises UserError. It imports no other module of common/.
"""
import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch
from lightning_fabric import Fabric
from lightning_fabric.connector import _is_using_cli


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


def note_without_effect(args, defaults, names, why):
    """One note naming the flags among `names` given a value other than their
    default (`defaults`: the parsed defaults) that `why` leaves without effect."""
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) != getattr(defaults, name)]
    if given:
        listed = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
        print(f"note: {listed} {'has' if len(given) == 1 else 'have'} no effect {why}")


def require_positive(**values):
    for name, value in values.items():
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


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


def _fail(message):
    raise UserError(message)
