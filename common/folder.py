"""The run folder: made and marked at a run's start (start_run, open_run_folder),
its checkpoints (written atomically and only with finite weights, resumed under
the rule of common/launch.py), and what each epoch's end writes into it.

A run folder holds its marker `.kd_run` (only such a folder is ever replaced by
--overwrite), `args.json`, `metrics.csv`, `results.json`, `last.ckpt`,
`best.ckpt`, plots (PNG, each with its data in a CSV), the trained weights as
safetensors and `logs/`. Every file is written to a temporary file and renamed,
so a kill at any moment leaves the last good one.

A run's `state` is the dict every checkpoint holds: the script's modules and
optimizer under names of its own, and "epoch" (epochs done), "history" (the rows
of metrics.csv), "best_top1" and "best_epoch" (of best.ckpt), "wall_s", "args"
(the run's flags), after --extend "extended_from", in 16-mixed "loss_scale". A
row has "epoch", "lr", the log's "loss", "loss_<term>" and "img_per_s" columns
and the script's evaluations (`top1*`, `top5*`, `agreement`, `ema_top1*`: None in
an epoch without a test; `val_*`: every epoch with --val-split).

Used by dml.py, deit.py, takd.py, ktg_ensemble.py; reproduce.py and common/graph.py,
landscape.py and study.py write their JSON and figures with it.
"""
import csv
import json
import os
import shutil
import time
from pathlib import Path

import torch

from common.launch import UserError, _fail, check_script, make_fabric, on_rank_zero, resume_refusal


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


def save_epoch(fabric, out, state, top1, panels, last):
    """End of an epoch: `last.ckpt`, `best.ckpt` if `top1` is the best so far
    (None: an epoch that did not evaluate, never the best; the same file, linked,
    not written twice), `metrics.csv` and, now and then and after the `last`
    epoch, `curves.png` (its `panels`, see plot_curves) from `state["history"]`."""
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
        if due or last:
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


def end_epoch(fabric, out, state, row, score, log, panels):
    """Record the epoch's `row` in `state["history"]` and its time, report it
    (`log`, the run's TrainLog), and save the run (`save_epoch`; `score` chooses
    best.ckpt, `panels` the curves)."""
    state["history"].append(row)
    state["epoch"] = row["epoch"]
    state["wall_s"] += log.elapsed()
    log.report(row)
    save_epoch(fabric, out, state, score, panels, last=row["epoch"] >= log.epochs)


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


def write_json(path, data):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_csv(path, rows):
    """Rewrite the whole table each time. Its columns are the rows' keys in order of
    appearance: a run resumed by a newer version of a script that writes more
    columns leaves them empty in its earlier rows."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
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
    plt = pyplot()
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


def pyplot():
    """matplotlib's pyplot on the Agg back end, which draws into files and needs no
    display; imported only when a run draws its first picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write a figure through a temporary file: a kill never leaves half a PNG."""
    import matplotlib.pyplot as plt

    tmp = Path(str(path) + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
    plt.close(fig)
