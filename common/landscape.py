"""Loss landscape (seed 000, Fig. 3): the training loss of a trained model against
the scale σ of Gaussian noise added to its weights, several draws per σ.

The noise of each weight tensor is scaled by that tensor's RMS,
θ' = θ + σ·rms(θ)·ε with ε ~ N(0, I), so σ is a relative perturbation and two
models with different weight norms are compared fairly (in the spirit of the
filter normalisation of Li et al., NeurIPS 2018). A wider minimum is a curve
that rises more slowly. A less confident model's loss also rises less, whatever
its minimum, so beside the rise over the clean loss each σ has the rise
relative to the clean loss and the top-1 drop on the same images.

Compare finished run folders (e.g. Independent and DML) on one plot:

    python -m common.landscape runs/independent runs/dml --out landscape_compare.png

Used by dml.py (--landscape) and reproduce.py (the DML table's Fig. 3).
"""
import argparse
import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from common.data import PADDING
from common.models import prediction

SIGMAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


@torch.no_grad()
def loss_curve(model, loader, fabric, sigmas=SIGMAS, draws=5, seed=0):
    """[{sigma, loss_mean, loss_std, top1_mean, rise, relative_rise, top1_drop}]: the
    CE loss and top-1 (%) on `loader`'s batches (summed over ranks), and, against
    the clean model (σ = 0, the first of `sigmas`), the loss rise, that rise as a
    share of the clean loss and the drop in top-1 (points)."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    original = [p.detach().clone() for p in params]
    scales = [p.float().pow(2).mean().sqrt() for p in original]
    # The same generator on every rank: all replicas get the same noise.
    generator = torch.Generator(fabric.device).manual_seed(seed)
    rows = []
    for sigma in sigmas:
        draws_of_sigma = []
        for _ in range(draws if sigma > 0 else 1):
            for p, p0, scale in zip(params, original, scales):
                noise = torch.randn(p.shape, device=p.device, generator=generator)
                p.copy_(p0 + sigma * scale * noise)
            total = torch.zeros(3, device=fabric.device)  # loss, correct, images
            for images, labels in loader.epoch():
                logits = prediction(model(images)).float()
                total[0] += F.cross_entropy(logits, labels, reduction="sum")  # padding labels are ignored
                total[1] += (logits.argmax(1) == labels).sum()
                total[2] += (labels != PADDING).sum()
            total = fabric.all_reduce(total, reduce_op="sum")
            draws_of_sigma.append([total[0] / total[2], 100 * total[1] / total[2]])
        losses, top1 = torch.tensor(draws_of_sigma).T
        rows.append({"sigma": sigma, "loss_mean": losses.mean().item(),
                     "loss_std": losses.std().item() if len(losses) > 1 else 0.0, "top1_mean": top1.mean().item()})
    for p, p0 in zip(params, original):
        p.copy_(p0)
    clean = rows[0]
    for row in rows:
        row.update(rise=row["loss_mean"] - clean["loss_mean"],
                   relative_rise=(row["loss_mean"] - clean["loss_mean"]) / clean["loss_mean"],
                   top1_drop=clean["top1_mean"] - row["top1_mean"])
    return rows


COLUMNS = ("sigma", "loss_mean", "loss_std", "top1_mean", "rise", "relative_rise", "top1_drop")


def write_csv(path, curves):
    """`curves` maps a label (student) to its rows."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["student", *COLUMNS])
        for label, rows in curves.items():
            for row in rows:
                writer.writerow([label, *(row[column] for column in COLUMNS)])


def read_csv(path):
    curves = {}
    with open(path) as file:
        for row in csv.DictReader(file):
            curves.setdefault(row["student"], []).append({k: float(row[k]) for k in COLUMNS if k in row})
    return curves


def plot(path, runs):
    """One panel per student, one colour per run (`runs` maps a run's name to
    its curves): the loss against σ, mean ± std over the noise draws, as in
    seed 000's Fig. 3. Returns the figure."""
    from common.folder import pyplot, save_figure

    plt = pyplot()
    students = list(dict.fromkeys(student for curves in runs.values() for student in curves))
    fig, axes = plt.subplots(1, len(students), figsize=(5 * len(students), 4), squeeze=False, sharey=True)
    for ax, student in zip(axes[0], students):
        for colour, (run, curves) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
            if student not in curves:
                continue
            rows = curves[student]
            sigma = [r["sigma"] for r in rows]
            mean = torch.tensor([r["loss_mean"] for r in rows])
            std = torch.tensor([r["loss_std"] for r in rows])
            ax.plot(sigma, mean, marker="o", color=colour, label=run)
            ax.fill_between(sigma, mean - std, mean + std, color=colour, alpha=0.2)
        ax.set(xlabel="noise scale σ (relative to each tensor's RMS)", title=f"student {student}")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def compare(folders, out):
    """Draw the landscape curves of several run folders together (one colour each); returns the figure."""
    out = Path(out)
    if out.is_dir():
        raise SystemExit(f"error: --out {out} is a folder: give the PNG file to write")
    if not out.parent.is_dir():
        above = next(path for path in out.parents if path.exists())
        raise SystemExit(f"error: --out {out}: {above} is a file, not a folder" if not above.is_dir()
                         else f"error: --out {out}: the folder {out.parent} does not exist")
    runs = {}
    for folder in map(Path, folders):
        if not (folder / "landscape.csv").is_file():
            raise SystemExit(f"error: {folder} has no landscape.csv (train it with --landscape)")
        mode = ""
        if (folder / "args.json").is_file():
            import json
            mode = json.loads((folder / "args.json").read_text()).get("mode", "")
        runs[folder.name if mode in folder.name else f"{folder.name} ({mode})"] = read_csv(folder / "landscape.csv")
    fig = plot(out, runs)
    print(f"wrote {out}")
    return fig


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Plot the loss landscapes of finished run folders together.")
    parser.add_argument("folders", nargs="+", help="run folders trained with --landscape")
    parser.add_argument("--out", default="landscape_compare.png", help="the PNG to write")
    args = parser.parse_args()
    compare(args.folders, args.out)
