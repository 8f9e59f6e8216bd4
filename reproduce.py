"""Each seed document's table, rerun at CPU scale over several seeds.

    python reproduce.py dml              # seed 000: Table 1 (Independent, DML (ViT), DML (DeiT)) and Fig. 3
    python reproduce.py deit             # seeds 001/003: no distillation, soft, hard, from a CNN teacher
    python reproduce.py takd             # seed 004: NOKD, BLKD, TAKD, the assistant sweep, the automatic choice
    python reproduce.py ktg              # seed 002: ensembles of 3 ABNs, Independent, DML, a searched graph
    python reproduce.py dml --quick      # the whole table on 100 training images (TAKD 500), 1 epoch
    python reproduce.py takd --dataset imagefolder --data-dir results/cifar10 --img-size 32  # real CIFAR-10

Every (configuration, seed) is one run of the method script as it is (its
`main`, in this process) in `--out/runs/<configuration>/seed<k>`: a finished run
is reused, a killed one resumed, so rerunning the command after a kill goes on
where it stopped; a run is locked while it trains, so that two processes
working on one table never train it twice. The teacher of a table is trained
once, not per seed, so the spread over seeds is the students' alone;
`--split-seed` stays 0, so every seed trains on the same images and only
weights, data order and augmentation vary. One process runs a table: under
`fabric run` or torchrun with several, it stops with one line.

`--dataset`, `--data-dir` and `--img-size` go to every run (default: the
embedded cifar10-mini), the runs to `results/<table>-<dataset>`; a finished run
is reused only if made on the same data with the same flags.
Written to `--out` (default `results/<table>`): `table.json` (the data set,
the settings, every row's per-seed values, mean and std; every claim of the
seed document with its verdict), `table.md` and `table.png`.

Verdicts. A claim "A > B" is judged on the paired per-seed differences
A_i − B_i (same seed, same images) by a paired t-test (`claim`): mean, 95 %
interval (Student's t, n − 1 degrees of freedom), p and n. It *holds* when the
interval lies above 0, is *contradicted* when below, else *inconclusive*
(always with n < 2). Each claim and table also state the minimum detectable
effect, the true difference that test finds with 80 % power at the observed
spread (`minimum_detectable_effect`): with 3 seeds the interval is ± 2.5 and
the MDE 3.3 standard deviations of the differences, so an *inconclusive* claim
with a large MDE says the table cannot tell, not that there is no effect.

Settings (`SETTINGS`, issue 22) are written for real CIFAR-10 (a class-balanced
part of its 50,000 training images, all 10,000 test images) and chosen so that
each table takes about 75 minutes on a 2-core CPU with 3 seeds and so that the
effects have their best honest chance: the methods are regularisers and
teachers, which help where the baseline overfits or where the teacher knows
more than the student sees. Every method of a table uses the same
hyper-parameters, fixed before any run (the scripts' defaults, or the value
written beside SETTINGS, with the arithmetic of its time); nothing is tuned, on
validation or test. Where a table did not fit, its epochs were cut equally for
every row. Without flags the same settings run on cifar10-mini (5,000
training, 1,000 test images), offline.
"""
import argparse
import fcntl
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from scipy import optimize, stats

import deit
import dml
import ktg_ensemble
import takd
from common.data import DATASETS
from common.folder import pyplot, save_figure, write_json
from common.launch import HelpFormatter, UserError, exit_on_user_error, run_shaping_changes

SEEDS = [0, 1, 2]
QUICK_SEEDS = [0, 1]
RUNS_WALL_S = []  # each run's own wall time, finished now or before: what a table costs
CHANCE = {"cifar10-mini": 10.0, "cifar10": 10.0, "cifar100": 1.0}  # top-1 of a guess, in %; ImageFolder: unknown
ALPHA, POWER = 0.05, 0.80  # the paired t-test's level (two-sided) and the power a minimum detectable effect has
MARKER = {dml: "last.ckpt", deit: "last.ckpt", takd: "args.json", ktg_ensemble: "args.json"}  # what --resume needs

# Each table's flags: `full` for every run of it, and for its roles (teacher,
# students, ...) theirs beside; `quick` replaces each under --quick.
SETTINGS = {
    # 200 images per class for 100 epochs, batch 64 (31 steps an epoch), the seed's
    # AdamW recipe (5e-3 per 512, weight decay 0.05, cosine, 5 warm-up epochs) without
    # label smoothing and drop-path: neither seed 000 nor the DML paper uses them, and
    # both flatten the very outputs the KL transfers. The Independent pair should fit
    # its images (train top-1 near 100), the regime where mutual learning can
    # regularise. The test split (10,000 images on CIFAR-10) every 10 epochs.
    "dml": {"full": ["--train-subset", "2000", "--epochs", "100", "--batch-size", "64", "--smoothing", "0",
                     "--drop-path", "0", "--eval-every", "10"],
            "quick": ["--train-subset", "100", "--epochs", "1", "--batch-size", "50"]},
    # DeiT: 5,000 images for teacher and students alike (DeiT's teacher learns from
    # its students' data). One teacher, a CIFAR ResNet-20 at takd.py's ResNet recipe
    # (SGD 0.1, ÷10 at 50 and 75 %), trained once; the students on the DeiT recipe
    # (RandAugment, Mixup 0.8, CutMix 1.0, erasing 0.25, smoothing 0.1, drop-path
    # 0.1), whose mixed and distorted views are where a teacher can disagree with the
    # label; one repeat, as on one device the repeats fall in one batch; λ 0.5, τ 1
    # (the paper's); batch 64 at the DML table's AdamW rate (5e-3 per 512).
    # Time (CIFAR-10, 32 px, both cores, fastest of 2 epochs): the teacher 7.0 s an
    # epoch compiled (8.5 eager), the vit_micro 6.6 s, a deit_micro with the teacher
    # 8.4 s; a test pass 2.5–3.5 s. Issue 22's 160 and 60 epochs would take
    # 1,250 + 3 seeds × (60 × (6.7 + 2 × 8.5) + tests) s ≈ 95 min, so every epoch
    # count is cut by a quarter: 120 × 7.2 + 12 tests × 3.5 + 40 (compiling, data)
    # ≈ 950 s, then 3 × (45 × 23.7 + 15 tests × 2.6 + 15) ≈ 3,360 s: 72 min.
    "deit": {"full": ["--train-subset", "5000", "--eval-every", "10"],
             "quick": ["--train-subset", "100"],
             "teacher": {"full": ["--epochs", "120", "--compile"], "quick": ["--epochs", "1", "--batch-size", "50"]},
             "students": {"full": ["--epochs", "45", "--batch-size", "64", "--lr", "5e-3", "--recipe", "deit",
                                   "--repeated-aug", "1", "--distillation-alpha", "0.5", "--distillation-tau", "1"],
                          "quick": ["--epochs", "1", "--batch-size", "50", "--lr", "5e-3", "--recipe", "deit",
                                    "--repeated-aug", "1"]}},
    # TAKD: 5,000 images, 10 % held out for the automatic choice; plain CNNs at the
    # authors' recipe (takd.py's plain default: constant lr 0.01, no weight decay,
    # batch 128), λ 0.9, τ 4; students and assistants 30 epochs, the plain10 teacher
    # 60. Fig. 2's teachers plain4/6/8 are the automatic run's candidates, 30 epochs:
    # BLKD's plain10 had twice theirs. Time (4,500 images an epoch, fastest of 2):
    # plain10 8.0 s, plain8/6/4/2 2.5/2.0/1.6/0.7 s alone; plain10's forward adds
    # 2.8 s to a student's epoch, plain8/6/4's 1.0/0.8/0.7 s. Per seed: the automatic
    # run (plain2, 4, 6, 8 alone, plain10 → 6 → 2, BLKD) 540 s, the two other chains
    # 420 s, plain2 from each candidate 150 s; 3 × 1,110 + the teacher 530 + data
    # 90 ≈ 3,950 s: 66 min, no cut.
    # Quick: 500 images in batches of 10, so that the candidates leave chance (the
    # automatic choice refuses networks at chance).
    "takd": {"full": ["--train-subset", "5000", "--val-split", "0.1", "--eval-every", "10",
                      "--distillation-alpha", "0.9", "--distillation-tau", "4"],
             "quick": ["--train-subset", "500", "--val-split", "0.2", "--batch-size", "10"],
             "teacher": {"full": ["--epochs", "60"], "quick": ["--epochs", "1"]},
             "students": {"full": ["--epochs", "30"], "quick": ["--epochs", "1"]}},
    # KTG: 3 ResNet-8 ABNs on 5,000 images, 20 % (1,000) held out to score the search
    # and, for every row alike, to choose best.ckpt. The search: 48 random graphs at
    # 5 epochs, pruned by successive halving (common/study.py: rungs after epochs 2, 3
    # and 5, half kept at each: 3.0 epochs a graph, 128–167 epochs for 48 in 20
    # simulated searches), a run of its own, since ktg_ensemble.py trains search
    # trials for its --epochs. Then Independent, DML and the best graph retrained per
    # seed. Time (4,000 images, fastest of 2): 14.9 s an epoch, 15.6 with the
    # validation pass; a test pass about 6.5 s, the rest of a run (probe, pictures,
    # data) about 10. The search takes 145 × 15.6 + its own 5-epoch retrain ≈ 2,360 s,
    # so issue 22's 30 epochs (9 × 500 s, 114 min in all) are cut to 12 for every
    # row: 9 × (12 × 15.6 + 2 × 6.5 + 10) ≈ 1,890 s: 71 min (77 at the slowest
    # simulated search).
    "ktg": {"full": ["--train-subset", "5000", "--val-split", "0.2", "--eval-every", "10"],
            "quick": ["--train-subset", "100", "--val-split", "0.2"],
            "search": {"full": ["--search", "48", "--epochs", "5"], "quick": ["--search", "2", "--epochs", "1"]},
            "ensembles": {"full": ["--epochs", "12"], "quick": ["--epochs", "1"]}},
}


def role(table, name, quick):
    """The flags SETTINGS gives one role of a table (teacher, students, search,
    ensembles), beside those of every run."""
    return SETTINGS[table][name]["quick" if quick else "full"]


# --- runs -------------------------------------------------------------------

def train(script, folder, flags):
    """Run `script` with `flags` into `folder`; return its results.json. A finished
    run is reused (if it was made with these flags), a killed one resumed,
    anything else there replaced. Several reproduce.py processes may share a
    table: a run one of them is training, the others wait for."""
    folder = Path(folder)
    argv = [*map(str, flags), "--out", str(folder)]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, however it ends
        if (folder / "results.json").is_file():
            try:
                made = json.loads((folder / "args.json").read_text())
            except (OSError, ValueError) as error:
                raise UserError(f"{folder} has results.json but no readable args.json ({type(error).__name__}): "
                                f"delete it or give another --out") from None
            # flags left unset (None) were filled in by the run itself, e.g. --img-size from the data
            asked = {key: value for key, value in vars(script.parse_args(argv)).items() if value is not None}
            changed = run_shaping_changes(made, asked)
            # --data-dir may change when a run is resumed (the data moved), but a finished
            # run made on other data must not stand in for this one.
            if made.get("data_dir") != asked.get("data_dir"):
                changed.append("data_dir")
            if changed:
                raise UserError(f"{folder} was trained with other {', '.join(changed)}: delete it or give "
                                f"another --out")
        else:
            argv.append("--resume" if (folder / MARKER[script]).is_file() else "--overwrite")
            print(f"\n=== {script.__name__}.py {' '.join(argv)}", flush=True)
            script.main(script.parse_args(argv))
    results = json.loads((folder / "results.json").read_text())
    RUNS_WALL_S.append(results["wall_s"])
    return results


def summary(method, metric, values):
    """A table row: the per-seed values, their mean and sample standard deviation
    (None for a single value, which has none)."""
    values = [round(v, 3) for v in values]
    return {"method": method, "metric": metric, "values": values, "mean": round(statistics.mean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else None}


def claim(text, better, worse, unit="points"):
    """A claim that `better` beats `worse` (per-seed lists of the same seeds), judged
    by a paired t-test on the differences d_i = better_i − worse_i: their mean d̄,
    sample standard deviation s and number n; the 95 % interval
    d̄ ± t(0.975, n − 1) · s / √n; the two-sided p = 2 · P(T(n − 1) > |d̄| / (s / √n)).
    The verdict is `holds` when the interval lies above 0, `contradicted` when it
    lies below, else `inconclusive`. With n < 2 there is no interval: ci and p are
    None and the verdict `inconclusive`. With s = 0 (every seed the same difference)
    the formulas' limits as s → 0 are used: the interval is [d̄, d̄], p is 0 if
    d̄ ≠ 0 and 1 if d̄ = 0. `mde` is the minimum detectable effect at this s and n."""
    differences = [round(b - w, 6) for b, w in zip(better, worse)]  # rounded: equal differences are equal
    n, mean_difference = len(differences), statistics.mean(differences)
    ci_low = ci_high = p = mde = None
    if n >= 2:
        spread = statistics.stdev(differences)
        if spread == 0:
            ci_low = ci_high = mean_difference
            p = 0.0 if mean_difference != 0 else 1.0
        else:
            standard_error = spread / math.sqrt(n)
            half_width = stats.t.ppf(1 - ALPHA / 2, n - 1) * standard_error
            ci_low, ci_high = mean_difference - half_width, mean_difference + half_width
            p = 2 * stats.t.sf(abs(mean_difference) / standard_error, n - 1)
        mde = minimum_detectable_effect(spread, n)
    verdict = ("inconclusive" if ci_low is None or ci_low <= 0 <= ci_high
               else "holds" if ci_low > 0 else "contradicted")
    rounded = lambda x, digits=3: None if x is None else round(float(x), digits)
    return {"claim": text, "mean": rounded(mean_difference), "ci_low": rounded(ci_low), "ci_high": rounded(ci_high),
            "p": None if p is None else float(f"{p:.3g}"), "n": n, "verdict": verdict, "mde": rounded(mde),
            "unit": unit, "differences": differences}


def minimum_detectable_effect(spread, n, alpha=ALPHA, power=POWER):
    """The smallest true mean difference δ that a two-sided paired t-test at level
    `alpha` detects with probability `power`, for n pairs whose differences have the
    standard deviation `spread` (taken as the true σ). The statistic
    T = d̄ / (s / √n) follows the noncentral t with n − 1 degrees of freedom and
    noncentrality δ √n / σ, so with c = t(1 − α/2, n − 1), δ solves
        P(T > c) + P(T < −c) = power,
    found by bisection (brentq) on δ / σ. None for n < 2; 0 when the spread is 0."""
    if n < 2:
        return None
    if spread == 0:
        return 0.0
    df, critical = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)

    def shortfall(effect):  # power at a true mean difference of `effect` standard deviations, minus `power`
        noncentrality = effect * math.sqrt(n)
        # P(T < −c) as P(T' > c) with the noncentrality negated: nct.cdf far in its tail is NaN (scipy 1.17)
        return stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality) - power
    upper = 1.0
    while shortfall(upper) < 0:
        upper *= 2
    return optimize.brentq(shortfall, 0.0, upper, xtol=1e-10) * spread


def typical_mde(claims):
    """A table's minimum detectable effect: the median of its accuracy claims' (in points)."""
    values = [c["mde"] for c in claims if c["unit"] == "points" and c["mde"] is not None]
    return round(statistics.median(values), 3) if values else None


def final_train_ce(folder, columns, weight=1.0):
    """The last epoch's training CE (mean of `columns` in metrics.csv, each a loss
    term that is `weight` × the CE): how well the run fit its images."""
    lines = (Path(folder) / "metrics.csv").read_text().splitlines()
    header, last = lines[0].split(","), lines[-1].split(",")
    mean = statistics.mean(float(last[header.index(column)]) for column in columns)
    return mean / weight if weight else math.nan  # λ = 1: the CE had no weight, and is not in the log


def class_head_weight(folder):
    """1 - λ of a DeiT run with a teacher (its `ce` term is (1-λ)·CE), else 1."""
    args = json.loads((Path(folder) / "args.json").read_text())
    return 1.0 if args["distillation_type"] == "none" else 1 - args["distillation_alpha"]


# --- the tables ---------------------------------------------------------------

def dml_table(flags, seeds, runs, quick):
    """Seed 000, Table 1: Independent, DML (ViT) and DML (DeiT) for a pair of equal
    students, Independent and DML for unequal ones (a ViT and a CNN); Fig. 3: the loss
    landscape of an Independent and a DML student."""
    configs = {  # name -> students, mode, whether to draw the loss landscape (Fig. 3)
        "Independent (ViT), equal": (["vit_micro", "vit_micro"], "independent", True),
        "DML (ViT), equal": (["vit_micro", "vit_micro"], "dml", True),
        "DML (DeiT), equal": (["deit_micro", "deit_micro"], "dml", False),
        # Unequal students: a ViT with a CNN, which seed 000 allows; its Tiny/Small pair
        # (here vit_micro with vit_mini) costs 3.5 times as much, beyond the CPU budget.
        "Independent, ViT + CNN": (["vit_micro", "resnet8"], "independent", False),
        "DML, ViT + CNN": (["vit_micro", "resnet8"], "dml", False),
    }
    rows, top1, rise = [], {}, {}
    for name, (students, mode, draw) in configs.items():
        landscape = ["--landscape"] if draw else []
        results = []
        for seed in seeds:
            folder = runs / slug(name) / f"seed{seed}"
            results.append(train(dml, folder, [*flags, "--students", *students, "--mode", mode, "--seed", seed,
                                               *landscape]))
            if landscape:
                for measure in ("rise", "relative_rise", "top1_drop"):
                    rise.setdefault((name, measure), []).append(landscape_rise(folder, measure))
        for k, student in enumerate(students):
            top1[name, k] = [r["students"][k]["top1"] for r in results]
            rows.append(summary(name, f"top-1 student {k + 1} ({student})", top1[name, k]))
        rows.append(summary(name, "top-1 ensemble", [r["ensemble_top1"] for r in results]))
        for k, student in enumerate(students):  # near 100: the students fit their images (overfit)
            rows.append(summary(name, f"train top-1 student {k + 1} ({student})",
                                [r["students"][k]["train_top1"] for r in results]))
        rows.append(summary(name, "agreement of the students (test, %)", [r["agreement"] for r in results]))
        columns = [f"loss_ce_{k}" for k in range(len(students))]
        rows.append(summary(name, "final training CE", [final_train_ce(runs / slug(name) / f"seed{s}", columns)
                                                         for s in seeds]))
    measures = {"rise": "loss rise", "relative_rise": "loss rise / clean loss", "top1_drop": "train top-1 drop"}
    for (name, measure), values in rise.items():
        rows.append(summary(name, f"landscape: {measures[measure]} at the largest σ", values))

    def students_mean(name):
        return [statistics.mean(pair) for pair in zip(top1[name, 0], top1[name, 1])]

    ind, vit, dei = "Independent (ViT), equal", "DML (ViT), equal", "DML (DeiT), equal"
    claims = [claim("DML (ViT) > Independent, equal students (mean of the two)",
                    students_mean(vit), students_mean(ind)),
              claim("DML (DeiT) > Independent, equal students", students_mean(dei), students_mean(ind)),
              claim("DML (ViT) > DML (DeiT), equal students", students_mean(vit), students_mean(dei)),
              claim("DML > Independent for the ViT of unequal students (vit_micro with resnet8)",
                    top1["DML, ViT + CNN", 0], top1["Independent, ViT + CNN", 0]),
              claim("DML > Independent for the CNN of unequal students (resnet8 with vit_micro)",
                    top1["DML, ViT + CNN", 1], top1["Independent, ViT + CNN", 1]),
              claim("Fig. 3: a DML student's training loss rises more slowly under weight noise (wider minimum)",
                    [-v for v in rise[vit, "rise"]], [-v for v in rise[ind, "rise"]], unit="loss"),
              claim("Fig. 3, relative: a DML student's loss rises less relative to its clean loss",
                    [-v for v in rise[vit, "relative_rise"]], [-v for v in rise[ind, "relative_rise"]],
                    unit="share of the clean loss"),
              claim("Fig. 3, top-1: a DML student's training top-1 drops less under weight noise",
                    [-v for v in rise[vit, "top1_drop"]], [-v for v in rise[ind, "top1_drop"]])]
    from common.landscape import compare
    compare([runs / slug(ind) / f"seed{seeds[0]}", runs / slug(vit) / f"seed{seeds[0]}"],
            runs.parent / "landscape.png")
    return rows, claims


def landscape_rise(folder, measure="rise"):
    """Mean over the students of a landscape.csv `measure` at the largest σ: the loss
    rise over the clean loss, that rise relative to it, or the top-1 drop."""
    from common.landscape import read_csv
    curves = read_csv(Path(folder) / "landscape.csv").values()
    return statistics.mean(curve[-1][measure] for curve in curves)


def deit_table(flags, seeds, runs, quick):
    """Seeds 001/003: a CNN teacher trained here once on the students' images, then
    the student without distillation (a vit_*, the paper's baseline), with soft and
    with hard distillation; each head alone, the agreement with the teacher and how
    often the teacher's class differs from the label's on the training views."""
    teacher_run = train(takd, runs / "teacher", [*flags, *role("deit", "teacher", quick), "--chain", "resnet20",
                                                 "--seed", "0"])
    teacher = ["--teacher", "resnet20", "--teacher-ckpt", runs / "teacher" / "resnet20" / "last.ckpt"]
    rows = [summary("teacher resnet20 (trained once)", "top-1", [teacher_run["student_top1"]]),
            summary("teacher resnet20 (trained once)", "train top-1", [teacher_run["student_train_top1"]])]
    configs = {"none (vit_micro)": ["--model", "vit_micro", "--distillation-type", "none"],
               "soft (deit_micro)": ["--model", "deit_micro", "--distillation-type", "soft", *teacher],
               "hard (deit_micro)": ["--model", "deit_micro", "--distillation-type", "hard", *teacher]}
    top1 = {}
    for name, config in configs.items():
        results = [train(deit, runs / slug(name) / f"seed{seed}", [*flags, *role("deit", "students", quick),
                                                                   *config, "--seed", seed]) for seed in seeds]
        top1[name] = [r["top1"] for r in results]
        rows.append(summary(name, "top-1", top1[name]))
        if "--teacher" in config:
            top1[name, "cls"] = [r["top1_cls"] for r in results]
            top1[name, "dist"] = [r["top1_dist"] for r in results]
            rows += [summary(name, "top-1 class head", top1[name, "cls"]),
                     summary(name, "top-1 distillation head", top1[name, "dist"]),
                     summary(name, "agreement with the teacher", [r["teacher_agreement"] for r in results]),
                     summary(name, "teacher ≠ label on training views (%, last epoch)",
                             [r["teacher_disagreement"] for r in results])]
        rows.append(summary(name, "train top-1", [r["train_top1"] for r in results]))
        folders = [runs / slug(name) / f"seed{s}" for s in seeds]
        rows.append(summary(name, "final training CE", [final_train_ce(folder, ["loss_ce"], class_head_weight(folder))
                                                         for folder in folders]))
    none, soft, hard = configs
    claims = [claim("hard distillation > no distillation", top1[hard], top1[none]),
              claim("soft distillation > no distillation", top1[soft], top1[none]),
              claim("hard > soft distillation", top1[hard], top1[soft]),
              claim("hard: both heads together > the class head alone", top1[hard], top1[hard, "cls"]),
              claim("hard: both heads together > the distillation head alone", top1[hard], top1[hard, "dist"])]
    return rows, claims


def takd_table(flags, seeds, runs, quick):
    """Seed 004: a plain10 teacher trained once; for each seed NOKD, BLKD and TAKD
    with the assistant chosen automatically (on the validation split), the sweep of
    every candidate assistant, whose best is the choice in hindsight, and (Fig. 2)
    plain2 distilled from each candidate trained alone: a middle-sized teacher may
    teach better than the largest. The automatic run trains the candidates alone
    and the chain through the one it chose, so the sweep trains only the other
    chains, and the Fig. 2 runs start from its candidates' weights."""
    candidates, students = ["plain4", "plain6", "plain8"], role("takd", "students", quick)
    teacher_run = train(takd, runs / "teacher", [*flags, *role("takd", "teacher", quick), "--chain", "plain10",
                                                 "--seed", "0"])
    teacher = ["--teacher-ckpt", runs / "teacher" / "plain10" / "last.ckpt"]
    auto, via, taught = [], {c: [] for c in candidates}, {c: [] for c in candidates}
    for seed in seeds:
        run = train(takd, runs / "auto" / f"seed{seed}", [*flags, *students, *teacher, "--seed", seed, "--compare",
                                                         "--chain", "plain10", "auto", "plain2",
                                                         "--ta-candidates", *candidates])
        auto.append(run)
        for c in candidates:
            chain = run if c == run["chain"][1] else train(
                takd, runs / f"via-{c}" / f"seed{seed}",
                [*flags, *students, *teacher, "--seed", seed, "--chain", "plain10", c, "plain2"])
            via[c].append(chain["student_top1"])
            alone = runs / "auto" / f"seed{seed}" / c / "last.ckpt"  # c trained alone, by the automatic run
            taught[c].append(train(takd, runs / f"from-{c}-alone" / f"seed{seed}",
                                   [*flags, *students, "--teacher-ckpt", alone, "--seed", seed,
                                    "--chain", c, "plain2"])["student_top1"])
    nokd = [r["compare"]["nokd_top1"] for r in auto]
    blkd = [r["compare"]["blkd_top1"] for r in auto]
    takd_auto = [r["student_top1"] for r in auto]
    hindsight = [max(via[c][i] for c in candidates) for i in range(len(seeds))]
    chosen = [r["chain"][1] for r in auto]
    best = [max(candidates, key=lambda c: via[c][i]) for i in range(len(seeds))]
    rows = [summary("teacher plain10 (trained once)", "top-1", [teacher_run["student_top1"]]),
            summary("NOKD (plain2 alone)", "top-1", nokd),
            summary("BLKD (plain10 → plain2)", "top-1", blkd),
            summary("TAKD, assistant chosen automatically", "top-1", takd_auto),
            *[summary(f"TAKD via {c}", "top-1", via[c]) for c in candidates],
            summary("TAKD, best assistant in hindsight (chosen on test)", "top-1", hindsight),
            *[summary(f"KD from {c} trained alone ({c} → plain2)", "top-1", taught[c]) for c in candidates],
            summary("NOKD (plain2 alone)", "train top-1", [r["compare"]["nokd_train_top1"] for r in auto]),
            summary("BLKD (plain10 → plain2)", "train top-1", [r["compare"]["blkd_train_top1"] for r in auto]),
            summary("TAKD, assistant chosen automatically", "train top-1", [r["student_train_top1"] for r in auto]),
            *[summary(f"{c} alone", "top-1", [r["networks"][c]["top1"] for r in auto]) for c in candidates],
            *[summary(f"{c} alone", "validation top-1", [r["ta_choice"]["candidates"][c] for r in auto])
              for c in candidates]]
    claims = [claim("BLKD > NOKD", blkd, nokd),
              claim("TAKD (automatic assistant) > BLKD", takd_auto, blkd),
              claim("TAKD (automatic assistant) > NOKD", takd_auto, nokd),
              claim("TAKD (best assistant in hindsight) > BLKD", hindsight, blkd),
              choice_claim(chosen, best, takd_auto, hindsight),
              claim("Fig. 2: plain2 learns more from plain6 trained alone than from plain10 (BLKD)",
                    taught["plain6"], blkd),
              claim("Fig. 2: plain2 learns more from plain6 than from plain8, both trained alone",
                    taught["plain6"], taught["plain8"])]
    return rows, claims


def choice_claim(chosen, best, takd_auto, hindsight):
    """The automatic choice against the best assistant in hindsight: not a paired
    accuracy difference but a count, so no interval, p or MDE. Per seed, the
    difference is the choice's regret (its student's top-1 minus the best's, <= 0);
    the verdict is `holds` when the choice was (one of) the best in every seed, a
    tie counting as best, else `contradicted`."""
    regret = [round(a - h, 6) for a, h in zip(takd_auto, hindsight)]
    return {"claim": "the automatic choice is the best assistant in hindsight",
            "mean": round(statistics.mean(regret), 3), "ci_low": None, "ci_high": None, "p": None, "n": len(regret),
            "mde": None, "unit": "points",
            "verdict": "holds" if all(r >= 0 for r in regret) else "contradicted", "differences": regret,
            "seeds_best": f"{sum(r >= 0 for r in regret)}/{len(regret)}", "chosen": chosen, "best_in_hindsight": best}


def ktg_table(flags, seeds, runs, quick):
    """Seed 002: ensembles of three ABNs trained independently, by DML, and along
    the best graph of a search (scored on the validation split, seed 0), each
    retrained for every seed and tested."""
    nodes = ["--nodes", "resnet8_abn", "resnet8_abn", "resnet8_abn"]
    search = train(ktg_ensemble, runs / "search", [*flags, *role("ktg", "search", quick), *nodes, "--seed", "0"])
    configs = {"Independent": ["--graph", "independent"], "DML": ["--graph", "dml"],
               "KTG (searched graph)": ["--graph", runs / "search" / "best_graph.json"]}
    rows, ensemble, node_mean = [], {}, {}
    for name, graph in configs.items():
        results = [train(ktg_ensemble, runs / slug(name) / f"seed{seed}",
                         [*flags, *role("ktg", "ensembles", quick), *nodes, *graph, "--seed", seed]) for seed in seeds]
        ensemble[name] = [r["ensemble_top1"] for r in results]
        node_mean[name] = [r["node_mean_top1"] for r in results]
        rows += [summary(name, "top-1 ensemble", ensemble[name]),
                 summary(name, "top-1 mean of the nodes", node_mean[name]),
                 summary(name, "train top-1 mean of the nodes", [r["train_top1_mean"] for r in results]),
                 summary(name, "agreement of the nodes (test, %)", [r["agreement"] for r in results])]
    rows.append(summary("search (seed 0)", "best validation error", [search["search"]["best_val_error"]]))
    claims = [claim("DML > Independent (ensemble)", ensemble["DML"], ensemble["Independent"]),
              claim("DML > Independent (mean of the nodes)", node_mean["DML"], node_mean["Independent"]),
              claim("KTG > Independent (ensemble)", ensemble["KTG (searched graph)"], ensemble["Independent"]),
              claim("KTG > DML (ensemble)", ensemble["KTG (searched graph)"], ensemble["DML"])]
    return rows, claims


TABLES = {"dml": dml_table, "deit": deit_table, "takd": takd_table, "ktg": ktg_table}


def slug(name):
    """A folder name for a configuration: 'DML (ViT), equal' -> 'dml-vit-equal'."""
    kept = "".join(c if c.isalnum() else " " for c in name.lower())
    return "-".join(kept.split())


# --- reports --------------------------------------------------------------------

def write_markdown(path, table):
    data = table["dataset"] + (f" in {table['data_dir']}" if table["data_dir"] else "")
    lines = [f"Table `{table['table']}` on {data}, seeds {table['seeds']}, "
             f"the runs' wall time {table['runs_wall_s'] / 60:.1f} min", "",
             "| method | metric | mean ± std | n | per seed |", "|---|---|---:|---:|---|"]
    for r in table["rows"]:
        digits = 2 if "top-1" in r["metric"] or "agreement" in r["metric"] else 3  # accuracies in points, else losses
        spread = f" ± {r['std']:.{digits}f}" if r["std"] is not None else ""
        lines.append(f"| {r['method']} | {r['metric']} | {r['mean']:.{digits}f}{spread} | "
                     f"{len(r['values'])} | {', '.join(f'{v:.{digits}f}' for v in r['values'])} |")
    lines += ["", "Claims, on the paired per-seed differences (in points of top-1 unless marked): *holds* when "
                  "the 95 % interval lies above 0, *contradicted* when below, else *inconclusive*; MDE: the "
                  "difference a paired t-test (α = 0.05) finds with 80 % power at this spread and n.",
              "", "| claim | mean difference | 95 % CI | p | n | verdict | MDE | per seed |",
              "|---|---:|---:|---:|---:|---|---:|---|"]
    for c in table["claims"]:
        digits = 2 if c["unit"] == "points" else 3
        number = lambda x: "—" if x is None else f"{x:+.{digits}f}"
        interval = "—" if c["ci_low"] is None else f"[{number(c['ci_low'])}, {number(c['ci_high'])}]"
        text = c["claim"] + ("" if c["unit"] == "points" else f" ({c['unit']})")
        p = "—" if c["p"] is None else f"{c['p']:.2g}"
        mde = "—" if c["mde"] is None else f"{c['mde']:.{digits}f}"
        lines.append(f"| {text} | {number(c['mean'])} | {interval} | {p} | {c['n']} | {c['verdict']} | {mde} | "
                     f"{', '.join(number(d) for d in c['differences'])} |")
    typical = table["minimum_detectable_effect"]
    lines += ["", "Minimum detectable effect of this table (the median over its accuracy claims): "
                  + ("—" if typical is None else f"{typical:.2f} points")]
    Path(path).write_text("\n".join(lines) + "\n")


def plot_table(path, table, chance=10.0):
    """table.png: every top-1 row as a dot (mean) with its spread (± std) and one small
    dot per seed, on an axis from 0 with chance level (`chance` %, 10 for CIFAR-10's
    10 classes; None draws no line) dotted."""
    plt = pyplot()
    rows = [r for r in table["rows"] if "top-1" in r["metric"] and "validation" not in r["metric"]]
    labels = [f"{r['method']}: {r['metric']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.2))
    y = range(len(rows))
    ax.errorbar([r["mean"] for r in rows], y, xerr=[r["std"] or 0.0 for r in rows], fmt="o", color="tab:blue",
                capsize=3)
    for i, r in enumerate(rows):
        ax.plot(r["values"], [i] * len(r["values"]), "k.", markersize=4)
    if chance is not None:
        ax.axvline(chance, color="gray", linestyle=":", label=f"chance ({chance:g} %)")
        ax.legend(loc="lower right")
    high = max(max(r["values"]) for r in rows)
    ax.set(yticks=list(y), yticklabels=labels, xlabel="test top-1 (%)", xlim=(0, min(100, high + 5)),
           title=f"{table['table']}: mean ± std over seeds {table['seeds']} (dots: each seed)")
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("table", choices=TABLES, help="which seed document's table")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help=f"training seeds (default: {SEEDS}, with --quick {QUICK_SEEDS})")
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, 100 training images (TAKD 500), one epoch: a smoke test")
    parser.add_argument("--dataset", choices=DATASETS,
                        help="the data set of every run (default: the scripts' own, the embedded cifar10-mini)")
    parser.add_argument("--data-dir", help="where --dataset is, given to every run")
    parser.add_argument("--img-size", type=int, help="the training resolution of every run (default: the "
                                                     "scripts' own, 32 for CIFAR, 224 for ImageFolder)")
    parser.add_argument("--out", help="where runs and the table go (default: results/<table>, with --dataset D "
                                      "results/<table>-D, with --quick a further -quick)")
    return parser.parse_args(argv)


def refuse_several_processes():
    """Under `fabric run` or torchrun with several processes each would run the table:
    one takes a run's lock and waits for the others in the run's process-group
    set-up, while they wait for the lock, for ever. Rank 0 stops with one line; the
    others wait for the launcher to end them, so that the line comes once."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if int(os.environ.get("RANK", "0")) > 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ended quietly, not as an interrupted table
        time.sleep(60)
        sys.exit(2)
    raise UserError(f"reproduce.py runs in one process (here WORLD_SIZE={os.environ['WORLD_SIZE']}): start it with "
                    f"python, not fabric run or torchrun")


def main(args):
    refuse_several_processes()
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds repeats a seed: {seeds}")
    if min(seeds) < 0:
        raise UserError(f"--seeds must be non-negative, got {seeds}")
    if args.data_dir and not args.dataset:
        raise UserError("--data-dir needs --dataset (the default, cifar10-mini, is embedded)")
    if args.dataset not in (None, "cifar10-mini") and not args.data_dir:
        raise UserError(f"--dataset {args.dataset} needs --data-dir")
    if args.img_size is not None and args.img_size <= 0:
        raise UserError(f"--img-size must be positive, got {args.img_size}")
    dataset = args.dataset or "cifar10-mini"
    out = Path(args.out or f"results/{args.table}{'' if dataset == 'cifar10-mini' else '-' + dataset}"
                           f"{'-quick' if args.quick else ''}")
    for above in (out, *out.parents):
        if above.exists() and not above.is_dir():
            raise UserError(f"--out {out}: {above} is a file, not a folder")
    # a table folder holds its table's files and runs/: never write into a user's folder
    if out.is_dir() and any(out.iterdir()) and not (out / "runs").is_dir():
        raise UserError(f"--out {out} exists, is not empty and is not a table folder of this project (it has no "
                        f"runs/): give another --out")
    try:
        made = json.loads((out / "table.json").read_text()).get("table")
    except (OSError, ValueError, AttributeError):
        made = None
    if made not in (None, args.table):
        raise UserError(f"--out {out} holds the {made} table: give the {args.table} table another --out")
    flags = [*(["--dataset", args.dataset] if args.dataset else []),
             *(["--data-dir", args.data_dir] if args.data_dir else []),
             *(["--img-size", args.img_size] if args.img_size else []),
             *SETTINGS[args.table]["quick" if args.quick else "full"]]
    start = time.perf_counter()
    RUNS_WALL_S.clear()
    rows, claims = TABLES[args.table](flags, seeds, out / "runs", args.quick)
    table = {"table": args.table, "dataset": dataset, "data_dir": args.data_dir, "img_size": args.img_size,
             "seeds": seeds, "quick": args.quick, "settings": flags,
             "role_settings": {name: role(args.table, name, args.quick) for name, value in SETTINGS[args.table].items()
                               if isinstance(value, dict)},
             "runs_wall_s": round(sum(RUNS_WALL_S), 1),  # what the table costs, however often it was resumed
             "wall_s": round(time.perf_counter() - start, 1), "rows": rows, "claims": claims,
             "minimum_detectable_effect": typical_mde(claims)}
    write_json(out / "table.json", table)
    write_markdown(out / "table.md", table)
    plot_table(out / "table.png", table, CHANCE.get(dataset))
    print("\n" + (out / "table.md").read_text() + f"\nwrote {out}/table.json, table.md, table.png")


if __name__ == "__main__":
    exit_on_user_error(main, parse_args())
