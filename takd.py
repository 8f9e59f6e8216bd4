"""Teacher Assistant Knowledge Distillation: teacher → assistant(s) → student chains.

Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant", AAAI
2020 (arXiv 1902.03393; seed 004). The first network of `--chain` is the
teacher, trained alone; each next one learns by ordinary KD from the one before:

    L = (1-λ)·CE(ψ(Z_s), y) + λ·τ²·KL(ψ(Z_t/τ) ‖ ψ(Z_s/τ))

A large gap between teacher and student hurts KD; an assistant (TA) of
intermediate size closes it. The paper finds the best TA is the one whose
*accuracy* lies midway between the teacher's and the student's, and leaves the
automatic choice open. `auto` in the chain makes it: each `--ta-candidates`
network is trained alone and the one nearest the midpoint of its neighbours'
accuracies (of those above chance) becomes the TA, all scored on `--val-split`,
held-out training images, never on the test split. `--compare` adds the paper's
baselines: the student alone (NOKD) and distilled from the teacher (BLKD).

Recipes, one per network (a chain may mix them); SGD momentum 0.9, 150 epochs,
crop + flip, lr at the authors' batch 128, scaled linearly with `--batch-size`:
- plain CNNs, the authors' code: a constant lr 0.01 (`if models_are_plane: lr =
  0.01`; the paper's text says 0.1), no weight decay (the paper; their code keeps
  1e-4), no warm-up. On cifar10-mini (20 epochs) plain4 died at 0.1 (10 %, every
  output constant) and reached 51.9 % at 0.01; plain2 36.4 % against 50.3 %.
- ResNets and the rest: lr 0.1, ÷10 at 50 % and 75 % of the epochs (what the
  authors' code means, which a bug leaves at 0.01), weight decay 1e-4, a linear
  warm-up over the first epoch (as He et al. 2016 for ResNet-110). `--lr`,
  `--weight-decay`, `--schedule`, `--warmup-epochs` set one value for every
  network. λ = 0.9, τ = 4 are the usual CIFAR KD setting (Tian et al., CRD, ICLR
  2020); the authors searched them for each step.

Each trained network has a sub-folder named by its lineage (`plain10`,
`plain10_to_plain4`, `plain10_to_plain4_to_plain2`), so the chain, the
candidates and the baselines share what they can and nothing is trained twice.
A teacher passes on its weights at the end of its training. `--resume`
continues a killed run at the network it was training.

    python takd.py --chain plain10 plain4 plain2
    python takd.py --chain resnet110 resnet20 resnet8 --compare --dataset cifar100 --data-dir data
    python takd.py --chain plain10 auto plain2 --ta-candidates plain4 plain6 plain8 --val-split 0.1
    fabric run --devices 2 takd.py --chain resnet110 resnet20 resnet8 --teacher-ckpt runs/teacher/last.ckpt

Expect (paper, CIFAR-100): resnet110 72.38, resnet20 67.03, resnet8 61.37
alone; resnet110→resnet8 61.41; resnet110→resnet20→resnet8 61.82. At the scale
of a CPU the effect need not show (RESULTS.md); each network's `train_top1`, on
1,000 of its training images, tells underfitting from overfitting.
"""
import argparse

import torch

from common.data import PADDING, add_data_flags, load_run_data, make_loader, probe_split
from common.folder import (EVAL_RESULTS, end_epoch, load_checkpoint, load_for_eval, pyplot, run_fields, save_figure,
                           start_run, write_csv, write_json)
from common.launch import (HelpFormatter, UserError, add_run_flags, check_fraction, check_shared_flags,
                           exit_on_user_error, finish, inference_dtype, note_without_effect, on_rank_zero,
                           parse_with_config, require_positive)
from common.loop import TrainLog, evaluates_test, seed_epoch, step_schedule
from common.losses import cross_entropy, kd_loss
from common.models import (add_model_module_flag, count_parameters, create_model, describe_pretrained, freeze,
                           import_model_modules, load_pretrained, load_teacher, model_name_in, save_weights)

AUTO = "auto"
# Each family's recipe (see the docstring); --lr, --weight-decay, --schedule, --warmup-epochs override it
RECIPES = {"plain": {"lr": 0.01, "weight_decay": 0.0, "schedule": "constant", "warmup_epochs": 0.0},
           "resnet": {"lr": 0.1, "weight_decay": 1e-4, "schedule": "step", "warmup_epochs": 1.0}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--chain", nargs="+", default=["plain10", "plain4", "plain2"], help="teacher, assistant(s), "
                        "student: plain<2..10>, resnet<depth>, any model, or auto (one network: train it alone)")
    parser.add_argument("--ta-candidates", nargs="+", default=[], help="networks an `auto` in the chain chooses from")
    parser.add_argument("--teacher-ckpt", help="weights of the chain's first network, instead of training it")
    parser.add_argument("--compare", action="store_true",
                        help="also train the student alone (NOKD) and from the teacher directly (BLKD)")
    parser.add_argument("--distillation-alpha", type=float, default=0.9, help="λ: weight of the KD term, 1-λ of CE")
    parser.add_argument("--distillation-tau", type=float, default=4.0, help="τ: softmax temperature of the KD term")
    add_data_flags(parser, "chooses best.ckpt and the `auto` assistant (0: off; `auto` needs it)")
    parser.add_argument("--epochs", type=int, default=150, help="training epochs of every network")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size over all devices")
    parser.add_argument("--lr", type=float, help="SGD learning rate for batch 128, scaled by batch/128 "
                                                 "(default: 0.01 for plain CNNs, else 0.1)")
    parser.add_argument("--weight-decay", type=float, help="SGD weight decay (default: 0 for plain CNNs, else 1e-4)")
    parser.add_argument("--schedule", choices=["step", "constant"],
                        help="step: ÷10 at 50 %% and 75 %% of epochs (default: constant for plain CNNs, else step)")
    parser.add_argument("--warmup-epochs", type=float, help="linear lr warm-up (default: 0 for plain CNNs, else 1)")
    add_model_module_flag(parser)
    parser.add_argument("--pretrained", help="start the student (the chain's last network, in every lineage) from "
                                             "this local weights file, loaded as timm does")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="evaluate the test split every N epochs and at the last (validation: every epoch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    add_run_flags(parser, "takd", "the trained networks")
    return parse_with_config(parser, argv, script="takd")


def check_args(args):
    check_shared_flags(args)
    chain = args.chain
    if len(chain) < 2 and args.compare:  # a chain of one network trains it alone, e.g. a teacher for later runs
        raise UserError(f"--compare needs a teacher and a student in --chain, got {' '.join(chain)}")
    if AUTO in (chain[0], chain[-1]):
        raise UserError("--chain: the teacher and the student cannot be `auto`, only the networks between them")
    if any(a == b == AUTO for a, b in zip(chain, chain[1:])):  # the midpoint rule needs both neighbours' accuracies
        raise UserError("--chain: two `auto`s in a row are not defined; put a network between them")
    if AUTO in chain and not args.ta_candidates:
        raise UserError("--chain has `auto` but --ta-candidates names no networks to choose from")
    if AUTO in args.ta_candidates:
        raise UserError("--ta-candidates must name networks, not `auto`")
    if AUTO not in chain:
        note_without_effect(args, parse_args([]), ["ta_candidates"], "without `auto` in --chain")
    if args.pretrained and chain[-1] in chain[:-1] + args.ta_candidates:  # its sub-folder would serve two roles
        raise UserError(f"--pretrained starts the student {chain[-1]}, which cannot also be a teacher, TA or candidate")
    if AUTO in chain and not args.val_split:
        raise UserError("--chain has `auto`, which chooses on held-out training images: give --val-split "
                        "(e.g. 0.1), never the test split")
    check_fraction("distillation_alpha", args.distillation_alpha, high_included=True)
    require_positive(distillation_tau=args.distillation_tau)
    if len(chain) == 1:
        note_without_effect(args, parse_args([]), ["distillation_alpha", "distillation_tau"],
                            "on a chain of one network (it trains alone)")


def recipe_of(name, args):
    """The lr (at batch 128), weight decay, schedule and warm-up that network `name`
    trains with: its family's (plain CNNs, or the others), or the flags' where given."""
    family = RECIPES["plain" if name.startswith("plain") else "resnet"]
    return {key: default if getattr(args, key) is None else getattr(args, key) for key, default in family.items()}


def learning_rate(recipe, args, epoch, step, steps_per_epoch):
    """The rate of `recipe` at this step: scaled by --batch-size/128, after a linear
    warm-up, constant or ÷10 at half and three quarters of --epochs (as the authors'
    `int(epochs*3/4.0)`; never in the first epoch)."""
    milestones = [max(1, args.epochs // 2), max(1, args.epochs * 3 // 4)] if recipe["schedule"] == "step" else []
    return step_schedule(recipe["lr"] * args.batch_size / 128, epoch, step, steps_per_epoch, milestones,
                         recipe["warmup_epochs"])


def curve_panels(network):
    """What each network's curves.png draws."""
    return [("training loss", [("loss", "total"), ("loss_ce", "(1-λ)·CE"), ("loss_kd", "λ·τ²·KL to the teacher")]),
            ("top-1 (%)", [("top1", network), ("val_top1", f"{network} (validation)")]),
            ("learning rate", [("lr", "lr")])]


def choose_assistant(candidates, teacher_top1, student_top1, num_classes):
    """The candidate whose accuracy (trained alone) lies nearest the midpoint of the
    teacher's and the student's: the paper's rule for the best TA. A candidate within
    2 points of chance learned nothing (as plain4 at lr 0.1: constant outputs) and is
    left out. Returns the choice: the chosen, the left out {name: top1}, the midpoint."""
    excluded = {name: top1 for name, top1 in candidates.items() if top1 <= 100 / num_classes + 2}
    alive = [name for name in candidates if name not in excluded]
    if not alive:
        raise UserError(f"no --ta-candidates network is more than 2 points above chance ({100 / num_classes:.0f} %) "
                        f"on the validation split, {excluded}: none can be an assistant")
    midpoint = (teacher_top1 + student_top1) / 2
    return {"candidates": candidates, "excluded": excluded, "teacher_top1": teacher_top1,
            "student_alone_top1": student_top1, "midpoint": midpoint, "scored_on": "validation",
            "chosen": min(alive, key=lambda name: abs(candidates[name] - midpoint))}


# --- training and evaluation -------------------------------------------------


@torch.no_grad()
def evaluate(model, loader, fabric):
    """Top-1 and top-5 (%) on the test split."""
    model.eval()
    counts = torch.zeros(3, device=fabric.device)  # correct in the top 1, in the top 5, images
    dtype = next(model.parameters()).dtype  # a frozen teacher may be held in bf16
    for images, labels in loader.epoch():
        with fabric.autocast():
            scores = model(images.to(dtype)).float()
        top = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]
        counts += torch.stack([top[:, 0].sum(), top.any(1).sum(), (labels != PADDING).sum()])
    counts = fabric.all_reduce(counts, reduce_op="sum")
    return (100 * counts[:2] / counts[2]).tolist()


def train_network(lineage, teacher, out, fabric, data, loaders, args):
    """Train the network `lineage[-1]` alone (a lineage of one, teacher None) or by
    KD from the frozen `teacher`, trained along `lineage[:-1]`, in its sub-folder of
    `out`; continue from its last checkpoint if it has one. Returns the trained
    network, frozen for use as the next teacher, and its results."""
    name, folder = lineage[-1], out / "_to_".join(lineage)
    if args.compile:  # the plain CNNs share one forward: past dynamo's recompile limit (8) it would run eager
        torch._dynamo.reset()
    torch.manual_seed(args.seed)  # the same initial weights alone and distilled
    model = create_model(name, len(data["classes"]), args.img_size, device=fabric.device)
    pretrained = load_pretrained(model, args.pretrained) if args.pretrained and name == args.chain[-1] else None
    if pretrained:
        fabric.print(f"{folder.name}: {describe_pretrained(pretrained)}")
    recipe = recipe_of(name, args)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9, weight_decay=recipe["weight_decay"])
    model, optimizer = fabric.setup(torch.compile(model) if args.compile else model, optimizer)
    state = dict(model=model, optimizer=optimizer, epoch=0, history=[], best_top1=-1.0, wall_s=0.0, images=0,
                 train_s=0.0, model_name=name, args=vars(args))  # model_name: the network its checkpoints hold
    if on_rank_zero(fabric, (folder / "last.ckpt").is_file()):
        load_checkpoint(fabric, folder / "last.ckpt", state, args)
        fabric.print(f"{folder.name}: continuing at epoch {state['epoch']}" if state["epoch"] < args.epochs
                     else f"{folder.name}: trained already, reusing it")
    elif fabric.is_global_zero:
        folder.mkdir(parents=True, exist_ok=True)

    steps_per_epoch = len(loaders["train"])
    log = TrainLog(fabric, args, folder, steps_per_epoch, folder.name)
    for epoch in range(state["epoch"], args.epochs):
        seed_epoch(fabric, args.seed, epoch)
        model.train()
        log.begin(epoch)
        for step, (images, labels) in enumerate(loaders["train"].epoch(epoch)):
            rate = learning_rate(recipe, args, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = rate
            logits = model(images)
            if teacher is None:
                terms = {"ce": cross_entropy(logits, labels)}
            else:
                with torch.no_grad():
                    teacher_logits = teacher(images.to(next(teacher.parameters()).dtype))
                terms = kd_loss(logits, teacher_logits, labels, args.distillation_alpha, args.distillation_tau)
            loss = sum(terms.values())
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.step(step, loss, terms, len(labels))
        means = log.end()

        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **means, "top1": None, "top5": None}
        if evaluates_test(epoch, args.epochs, args.eval_every):  # else empty in metrics.csv, never best.ckpt
            row["top1"], row["top5"] = evaluate(model, loaders["test"], fabric)
        score = row["top1"]
        if loaders["val"] is not None:  # best.ckpt is chosen on the validation split, never on test
            row["val_top1"] = score = evaluate(model, loaders["val"], fabric)[0]
        state.update(images=state["images"] + log.images, train_s=state["train_s"] + log.seconds)
        end_epoch(fabric, folder, state, row, score, log, curve_panels(folder.name))

    last = state["history"][-1]
    result = {"model": name, "teacher": "_to_".join(lineage[:-1]) or None, "folder": folder.name, "loaded": False,
              "params": count_parameters(model), "top1": last["top1"], "top5": last["top5"],
              "val_top1": last.get("val_top1"), "train_top1": evaluate(model, loaders["probe"], fabric)[0], **recipe,
              "train_img_per_s": state["images"] / state["train_s"], "images": state["images"],
              "train_s": state["train_s"], "wall_s": state["wall_s"], "pretrained": pretrained}
    if fabric.is_global_zero:
        save_weights(folder / "model.safetensors", model, name, data)  # loadable with plain load_state_dict
        write_json(folder / "results.json", result)
    return freeze(model.module, inference_dtype(fabric), args.compile), result  # outside DDP: the next teacher


def main(args):
    import_model_modules(args.model_module)
    check_args(args)
    fabric, out = start_run(args, "takd", marker="args.json")

    data = load_run_data(fabric, args)
    for name in set(args.chain + args.ta_candidates) - {AUTO}:
        create_model(name, len(data["classes"]), args.img_size)  # an unknown name stops the run before training
    if fabric.is_global_zero and not args.eval:
        write_json(out / "args.json", vars(args))
    batch, workers = max(1, args.batch_size // fabric.world_size), args.workers
    loaders = {"train": make_loader(data, "train", batch, fabric, args.seed, workers=workers),
               "test": make_loader(data, "test", batch, fabric, workers=workers),
               "val": make_loader(data, "val", batch, fabric, workers=workers) if args.val_split else None,
               # a fixed part of the training images, without augmentation: how well a network fit them
               "probe": make_loader(probe_split(data, args.split_seed), "test", batch, fabric, workers=workers)}
    if args.eval:
        return evaluate_checkpoint(fabric, args, out, data, loaders)

    teacher_name, student_name = args.chain[0], args.chain[-1]
    loaded_teacher = None  # (network, results) of the chain's first network, from --teacher-ckpt
    if args.teacher_ckpt:
        teacher = freeze(load_teacher(teacher_name, args.teacher_ckpt, len(data["classes"]), args.img_size,
                                      device=fabric.device), inference_dtype(fabric), args.compile)
        figures = {key: None if loaders[split] is None else evaluate(teacher, loaders[split], fabric)[0]
                   for key, split in (("top1", "test"), ("val_top1", "val"), ("train_top1", "probe"))}
        loaded_teacher = (teacher, {"model": teacher_name, "teacher": None, "folder": None, "loaded": True, **figures,
                                    "checkpoint": args.teacher_ckpt, "params": count_parameters(teacher)})
        fabric.print(f"teacher {teacher_name} from {args.teacher_ckpt}: top1={figures['top1']:.2f}")

    networks = {}  # sub-folder -> results, for every network this run has trained or reused

    def train_chain(chain):
        """Train chain[0] alone (or take the --teacher-ckpt network), then each next by KD from
        the one before; return each step's results. A network finished before (in this run or
        the run resumed) is reloaded from its sub-folder, not trained again."""
        teacher, steps = None, []
        for i in range(len(chain)):
            lineage = chain[:i + 1]  # its sub-folder: plain10_to_plain4_to_plain2
            teacher, result = (loaded_teacher if lineage == [teacher_name] and loaded_teacher
                               else train_network(lineage, teacher, out, fabric, data, loaders, args))
            networks["_to_".join(lineage)] = result
            steps.append(result)
        return steps

    # `auto`: train the candidates and both neighbours alone, take the one nearest
    # the midpoint (of those above chance), all scored on the validation split
    chain, ta_choices = list(args.chain), []
    for i in [i for i, name in enumerate(chain) if name == AUTO]:
        before, after = train_chain([chain[i - 1]])[0]["val_top1"], train_chain([chain[i + 1]])[0]["val_top1"]
        candidates = {candidate: train_chain([candidate])[0]["val_top1"] for candidate in args.ta_candidates}
        choice = choose_assistant(candidates, before, after, len(data["classes"])) | {"position": i}
        choice["candidates_train_top1"] = {name: networks[name]["train_top1"] for name in candidates}
        ta_choices.append(choice)
        chain[i] = choice["chosen"]
        fabric.print(f"auto at position {i}: midpoint {choice['midpoint']:.2f} of {chain[i - 1]} and {chain[i + 1]} "
                     f"-> {chain[i]} ({candidates[chain[i]]:.2f})"
                     + (f"; left out, within 2 points of chance: {choice['excluded']}" if choice["excluded"] else ""))

    steps = [{"model": name, "teacher": chain[i - 1] if i else None, "top1": result["top1"],
              "train_top1": result["train_top1"], "folder": "_to_".join(chain[:i + 1])}
             for i, (name, result) in enumerate(zip(chain, train_chain(chain)))]
    compare = None
    if args.compare:  # each figure on the test split (top1) and on training images (train_top1)
        alone = {name: train_chain([name])[0] for name in chain}
        students = {"nokd": alone[student_name], "blkd": train_chain([teacher_name, student_name])[-1],
                    "takd": steps[-1]}
        compare = {f"{way}_{key}": result[key] for way, result in students.items() for key in ("top1", "train_top1")}
        compare |= {f"alone_{key}": {name: result[key] for name, result in alone.items()}
                    for key in ("top1", "train_top1")}

    # --- results ------------------------------------------------------------
    results_of_trained = [result for result in networks.values() if not result["loaded"]]
    train_s = sum(result["train_s"] for result in results_of_trained)
    results = {
        **run_fields(fabric, args, "takd"), "chain": chain, "requested_chain": args.chain,
        "distillation_alpha": args.distillation_alpha, "distillation_tau": args.distillation_tau,
        "steps": steps, "student_top1": steps[-1]["top1"], "student_train_top1": steps[-1]["train_top1"],
        "compare": compare, "ta_choice": (ta_choices[0] if len(ta_choices) == 1 else ta_choices) or None,
        "networks": networks,
        "train_img_per_s": sum(result["images"] for result in results_of_trained) / train_s if train_s else None,
        # each network's own time over every session: a resumed run counts the networks it reused
        "wall_s": sum(result["wall_s"] for result in results_of_trained),
    }
    if fabric.is_global_zero:
        write_json(out / "results.json", results)
        if compare:
            write_csv(out / "compare.csv", compare_rows(compare, chain))
        if compare or ta_choices:
            plot_comparison(out / "compare.png", compare, ta_choices, chain)
        print_summary(results, out)
    finish(fabric)


def evaluate_checkpoint(fabric, args, out, data, loaders):
    """--eval: one network's checkpoint (a sub-folder's last.ckpt or best.ckpt) on the test split."""
    name = model_name_in(args.eval)
    if name is None:
        raise UserError(f"--eval {args.eval} is not a network checkpoint of takd.py")
    model = fabric.setup_module(create_model(name, len(data["classes"]), args.img_size, device=fabric.device))
    state = {"model": model, "epoch": 0}
    load_for_eval(fabric, args.eval, state)
    top1, top5 = evaluate(model, loaders["test"], fabric)
    results = {**run_fields(fabric, args, "takd"), "model": name, "evaluated": str(args.eval),
               "epochs_trained": state["epoch"], "top1": top1, "top5": top5,
               "val_top1": evaluate(model, loaders["val"], fabric)[0] if loaders["val"] is not None else None}
    if fabric.is_global_zero:
        write_json(out / EVAL_RESULTS, results)
        print(f"{name} from {args.eval}: top-1 {top1:.2f}, top-5 {top5:.2f}")
    finish(fabric)


def compare_rows(compare, chain):
    """compare.csv, the bars of compare.png's first panel: each network of the chain
    alone, then the student by NOKD, BLKD and TAKD; top-1 on the test split and on
    training images (train_top1)."""
    rows = [{"network": f"{name} alone", "learned_from": "labels", "top1": top1,
             "train_top1": compare["alone_train_top1"][name]} for name, top1 in compare["alone_top1"].items()]
    return rows + [{"network": f"{chain[-1]} {way.upper()}", "learned_from": source, "top1": compare[f"{way}_top1"],
                    "train_top1": compare[f"{way}_train_top1"]}
                   for way, source in (("nokd", "labels"), ("blkd", chain[0]), ("takd", " -> ".join(chain[:-1])))]


def plot_comparison(path, compare, ta_choices, chain):
    """compare.png: the student by NOKD, BLKD and TAKD beside every network of the
    chain alone (with --compare), and for each `auto` the candidates' validation
    accuracies (green: chosen, red: left out near chance) against the midpoint it
    aims at (their data: compare.csv, results.json's ta_choice). Returns the figure."""
    plt = pyplot()
    panels = []  # (title, y label, {bar: value}, colours, horizontal lines)
    if compare:
        bars = {row["network"]: row["top1"] for row in compare_rows(compare, chain)}
        panels.append(("the student learning from labels, the teacher, the chain", "test top-1 (%)", bars,
                       ["lightgrey"] * (len(bars) - 3) + ["tab:grey", "tab:blue", "tab:green"], []))
    for choice in ta_choices:
        colours = ["tab:green" if name == choice["chosen"] else "tab:red" if name in choice["excluded"]
                   else "lightgrey" for name in choice["candidates"]]
        lines = [(choice["teacher_top1"], "teacher", ":"), (choice["midpoint"], "midpoint", "--"),
                 (choice["student_alone_top1"], "student alone", ":")]
        panels.append((f"auto at position {choice['position']}: {choice['chosen']}", "validation top-1 (%)",
                       choice["candidates"], colours, lines))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, label, values, colours, lines) in zip(axes[0], panels):
        ax.bar_label(ax.bar(list(values), list(values.values()), color=colours), fmt="%.1f", fontsize=8)
        for value, name, style in lines:
            ax.axhline(value, ls=style, color="black", lw=1, label=f"{name} {value:.1f}")
        ax.set(ylabel=label, title=title)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        if lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def print_summary(results, out):
    print(f"\ntakd on {results['dataset']}, {results['epochs']} epochs -> {out}")
    print(f"{'step':<6}{'network':<14}{'learned from':<14}{'top-1':>8}{'train':>8}")
    for i, s in enumerate(results["steps"]):
        print(f"{i:<6}{s['model']:<14}{s['teacher'] or 'labels':<14}{s['top1']:>8.2f}{s['train_top1']:>8.2f}")
    if results["compare"]:  # compare.csv
        print(f"\n{'':<20}{'top-1':>8}{'train':>8}")
        for row in compare_rows(results["compare"], results["chain"]):
            print(f"{row['network']:<20}{row['top1']:>8.2f}{row['train_top1']:>8.2f}")
    if results["train_img_per_s"]:
        print(f"train {results['train_img_per_s']:.0f} img/s, wall {results['wall_s']:.0f} s")


if __name__ == "__main__":
    exit_on_user_error(main, parse_args())
