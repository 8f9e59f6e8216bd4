"""Deep Mutual Learning of K vision transformers (and CNNs), with its Independent baseline.

Zhang et al., "Deep Mutual Learning", CVPR 2018; for ViTs, seed 000. K >= 2
students see the same batch; student k minimises (eq. 1-2)

    L_k = CE(p_k, y) + 1/(K-1) · Σ_{j≠k} KL(p_j ‖ p_k)

with the peers' p_j detached. Each student is a parameter group of one
optimizer (the same update as one optimizer each, with one launch and, in
16-mixed, one loss scale for all). All students are updated on the same batch
at once (the peers' predictions of this step, not of a peer already updated in
this step). `--mode independent` trains
the same students with CE only: with the same `--seed` both modes start from the
same weights and see the same data in the same order.

DeiT students (`deit_*`, seed 000's "DML (DeiT)" row): the CE goes to the
class-token head and the KL to the distillation-token head. Which output of a
peer that head mimics the seed leaves open; `--dml-target prediction` (the
default) takes the peer's prediction, its inference output (for a DeiT the
average of its two heads), which is what DML's p_j is and all a ViT or CNN peer
has; `--dml-target distillation` takes a DeiT peer's distillation-token output
(a plain peer's only head). In `independent` mode a DeiT has no peer to mimic,
so both of its heads learn from the label (their CEs averaged): a DeiT without
a teacher, which is not the paper's Independent row. For that row train
`vit_*` students (the same ViTs without the distillation token).

Recipe (seed 000): AdamW, weight decay 0.05, cosine schedule with 5 warm-up
epochs, batch 512, 300 epochs; label smoothing 0.1 and drop-path 0.1 as in
DeiT. The learning rate is `--lr` × batch/512. The seed writes a maximum of
0.005, DeiT's rule gives 5e-4. On cifar10-mini (vit_micro × 2, 2,500 images,
batch 128, 15 epochs) both trained stably and 0.005 learned faster (top-1
35.3/35.5 against 28.6/29.0); vit_tiny × 2 was stable with both (4 epochs).
So the default is the seed's 0.005; for long ImageNet runs without gradient
clipping, DeiT's `--lr 5e-4` is the safer choice.

    python dml.py                                             # vit_tiny × 2 on cifar10-mini
    fabric run dml.py --students vit_tiny vit_small
    fabric run --devices 2 dml.py --students vit_tiny vit_tiny --mode independent
    fabric run --accelerator cuda --devices 8 --precision bf16-mixed dml.py \\
        --dataset imagefolder --data-dir /data/imagenet --students deit_tiny deit_tiny

Expect (seed 000, ImageNet, Tiny/Tiny): Independent 65.8, DML (ViT) 71.6/71.8,
DML (DeiT) 69.1/69.2 top-1. At the scale of a CPU the effect need not show: on
cifar10-mini, vit_micro × 2, 30 epochs, batch 128, seed 0, DML gave 49.6/49.0
(ensemble 49.9) and Independent 50.7/48.5 (ensemble 51.4).
"""
import argparse
import contextlib
from pathlib import Path

import torch
from timm.utils import ModelEmaV3

from common.data import PADDING, add_data_flags, load_run_data, make_loader, probe_split
from common.folder import (EVAL_RESULTS, best_epoch, end_epoch, load_for_eval, resume_or_record, run_fields, start_run,
                           write_json)
from common.landscape import loss_curve, plot as plot_landscape, write_csv as write_landscape_csv
from common.launch import (HelpFormatter, UserError, add_run_flags, check_shared_flags, exit_on_user_error, finish,
                           note_without_effect, parse_with_config)
from common.loop import (TrainLog, accumulate, clip_gradients, cosine_schedule, evaluates_test,
                         optimizer_steps, peak_lr, resume_mid_epoch, save_mid_epoch, seed_epoch)
from common.losses import cross_entropy, dml_loss
from common.models import (add_model_module_flag, agreeing_pairs, count_parameters, create_model, describe_pretrained,
                           has_distillation_token, import_model_modules, load_pretrained, prediction, save_weights,
                           split_heads, weight_decay_groups)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--students", nargs="+", default=["vit_tiny", "vit_tiny"],
                        help="K >= 2 models: vit_*, deit_*, resnet<depth> or any timm name")
    parser.add_argument("--mode", choices=["dml", "independent"], default="dml",
                        help="dml: CE + KL to the peers; independent: CE only (the baseline: use vit_* students)")
    parser.add_argument("--dml-target", choices=["prediction", "distillation"], default="prediction",
                        help="the peer output a DeiT's distillation head mimics: the peer's prediction, or its "
                             "distillation-token output")
    parser.add_argument("--patch-size", type=int, help="ViT patch size (default: 4 up to 64 pixels, else 16)")
    add_data_flags(parser)
    parser.add_argument("--epochs", type=int, default=300, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=512, help="batch size over all devices")
    parser.add_argument("--grad-accum-steps", type=int, default=1,
                        help="accumulate this many batches per optimizer step (the effective batch is their sum)")
    parser.add_argument("--lr", type=float, default=5e-3,
                        help="peak learning rate for an effective batch of 512 (scaled linearly with it)")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up (at most a fifth of the run)")
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing of the CE")
    parser.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the ViTs")
    parser.add_argument("--clip-grad", type=float, help="clip each student's gradient norm to this (default: off)")
    parser.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of each student")
    parser.add_argument("--model-ema-decay", type=float, default=0.99996,
                        help="its decay per step (DeiT's), reached after a warm-up (timm's use_warmup)")
    add_model_module_flag(parser)
    parser.add_argument("--pretrained", nargs="+",
                        help="local weights file(s), one for all students or one each, loaded as timm does")
    parser.add_argument("--landscape", action="store_true", help="after training, write each student's loss landscape")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="evaluate the test split every N epochs and at the last (validation: every epoch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    add_run_flags(parser, "dml", "the students", extend=True)
    return parse_with_config(parser, argv, script="dml")


def check_args(args):
    if len(args.students) < 2:
        raise UserError(f"DML needs at least two students, got --students {' '.join(args.students)}")
    check_shared_flags(args)
    if args.pretrained and len(args.pretrained) not in (1, len(args.students)):
        raise UserError(f"--pretrained takes one file or one per student ({len(args.students)})")
    if args.mode == "independent" and args.dml_target != "prediction":
        print(f"note: --dml-target {args.dml_target} has no effect in independent mode (no peer to mimic)")
    if args.patch_size and not any(name.startswith(("vit", "deit")) for name in args.students):
        print("note: --patch-size has no effect: no student is a ViT")
    if not args.model_ema:
        note_without_effect(args, parse_args([]), ["model_ema_decay"], "without --model-ema")


# --- training and evaluation -------------------------------------------------


def student_losses(students, images, labels, args):
    """DML's terms on one batch, by name: student k's CE (`ce_k`) and, in dml mode,
    its KL to the peers (`kl_k`), so that L_k = ce_k + kl_k (seed 000 eq. 1-2). Their sum
    is backpropagated: L_k reaches only student k, the peers' predictions being detached."""
    outputs = [student(images) for student in students]
    target = prediction if args.dml_target == "prediction" else (lambda output: split_heads(output)[1])
    predictions = [target(output).detach() for output in outputs]  # the peers' targets
    terms = {}
    for k, output in enumerate(outputs):
        class_logits, mimic_logits = split_heads(output)
        if args.mode == "dml":
            peers = predictions[:k] + predictions[k + 1:]
            terms[f"ce_{k}"], terms[f"kl_{k}"] = dml_loss(class_logits, mimic_logits, peers, labels, args.smoothing)
        else:
            heads = output if isinstance(output, tuple) else (output,)
            terms[f"ce_{k}"] = sum(cross_entropy(head, labels, args.smoothing) for head in heads) / len(heads)
    return terms


def no_backward_sync(fabric, modules, enabled):
    """Fabric's no_backward_sync for several modules: skip DDP's gradient
    all-reduce in the backward of a batch that only accumulates."""
    stack = contextlib.ExitStack()
    for module in modules:
        stack.enter_context(fabric.no_backward_sync(module, enabled=enabled))
    return stack


def curve_panels(students):
    """What curves.png draws: each student's CE and KL (DML's two terms), the accuracies, the learning rate."""
    names = [f"{k}: {name}" for k, name in enumerate(students)]
    losses = [("loss", "total, all students")] + [(f"loss_ce_{k}", f"{name} CE") for k, name in enumerate(names)]
    losses += [(f"loss_kl_{k}", f"{name} KL", "right") for k, name in enumerate(names)]  # a hundredth of the CE
    accuracy = [(f"top1_{k}", name) for k, name in enumerate(names)] + [("top1_ensemble", "ensemble")]
    accuracy += [(f"val_{column}", f"{label} (validation)") for column, label in accuracy]
    accuracy += [(f"ema_top1_{k}", f"{name} EMA") for k, name in enumerate(names)]
    accuracy += [("agreement", "agreement of the students")]
    return [("training loss", losses), ("top-1 (%)", accuracy), ("learning rate", [("lr", "lr")])]


@torch.no_grad()
def evaluate(students, loader, fabric, emas=(), prefix=""):
    """One evaluation's columns, named as in metrics.csv (after `prefix`): each
    student's top-1 and top-5 (%, `top1_k`, `top5_k`), the ensemble's (the mean of
    their logits, `top1_ensemble`, `top5_ensemble`), the students' `agreement`
    (the share of images on which two of them predict the same class, averaged
    over the pairs) and each EMA copy's top-1 (`ema_top1_k`, one per model in
    `emas`): one pass over the data for all. Without a `loader` (an epoch without
    a test) the same columns, empty."""
    K = len(students)
    names = [*map(str, range(K)), "ensemble"]
    columns = [f"top{n}_{name}" for n in (1, 5) for name in names] + ["agreement"]
    columns += [f"ema_top1_{k}" for k in range(len(emas))]
    if loader is None:
        return {prefix + column: None for column in columns}
    models = [*students, *emas]
    for model in models:
        model.eval()
    counts = torch.zeros(len(models) + 2, 2, device=fabric.device)  # the students, ensemble, EMAs, agreeing images
    seen = torch.zeros((), device=fabric.device)
    for images, labels in loader.epoch():
        with fabric.autocast():  # for the EMA copies, which Fabric does not wrap
            logits = [prediction(model(images)).float() for model in models]
        counts[-1] += agreeing_pairs(logits[:K], labels)
        logits.insert(K, torch.stack(logits[:K]).mean(0))
        for i, scores in enumerate(logits):
            top = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]
            counts[i] += torch.stack([top[:, 0].sum(), top.any(1).sum()])
        seen += (labels != PADDING).sum()
    percent = (100 * fabric.all_reduce(counts, reduce_op="sum") / fabric.all_reduce(seen, reduce_op="sum")).tolist()
    values = [top1 for top1, _ in percent[:K + 1]] + [top5 for _, top5 in percent[:K + 1]] + [percent[-1][0]]
    values += [top1 for top1, _ in percent[K + 1:-1]]
    return {prefix + column: value for column, value in zip(columns, values)}


def learning_rate(args, lr, epoch, step, steps_per_epoch):
    """The rate at this step: a linear warm-up over --warmup-epochs, then a cosine
    down to --min-lr (timm's per-step schedule, as seed 000 trains)."""
    return cosine_schedule(lr, args.min_lr, args.epochs, args.warmup_epochs, epoch, step, steps_per_epoch)


def main(args):
    import_model_modules(args.model_module)
    check_args(args)
    fabric, out = start_run(args, "dml")

    data = load_run_data(fabric, args)
    num_classes = len(data["classes"])
    per_device_batch = max(1, args.batch_size // fabric.world_size)
    train_loader = make_loader(data, "train", per_device_batch, fabric, args.seed, workers=args.workers)
    test_loader = make_loader(data, "test", per_device_batch, fabric, workers=args.workers)
    val_loader = make_loader(data, "val", per_device_batch, fabric, workers=args.workers) if args.val_split else None

    models, emas, pretrained = [], [], []
    for k, name in enumerate(args.students):
        model = create_model(name, num_classes, args.img_size, args.patch_size, args.drop_path, fabric.device)
        if args.pretrained:
            pretrained.append(load_pretrained(model, args.pretrained[k % len(args.pretrained)]))
            fabric.print(f"student {k}: {describe_pretrained(pretrained[-1])}")
        if args.model_ema:
            emas.append(ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=True))
        models.append(model)
    if args.mode == "dml" and args.dml_target == "distillation" and not any(map(has_distillation_token, models)):
        fabric.print("note: --dml-target distillation acts as prediction here: no student has a distillation token")
    lr = peak_lr(args)  # --lr is for a batch of 512
    # one optimizer, a parameter group per student and decay kind: norms, biases, position
    # embeddings and tokens get no weight decay, as in timm and DeiT
    groups = [group for model in models for group in weight_decay_groups(model, args.weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    students = [fabric.setup_module(torch.compile(model) if args.compile else model) for model in models]
    optimizer = fabric.setup_optimizers(optimizer)
    steps_per_epoch = optimizer_steps(train_loader, args.grad_accum_steps)

    state = {f"student{k}": s for k, s in enumerate(students)}
    state.update({f"ema{k}": ema for k, ema in enumerate(emas)})
    state.update(optimizer=optimizer, epoch=0, history=[], best_top1=-1.0, wall_s=0.0)
    if args.eval:
        return evaluate_checkpoint(fabric, args, out, state, students, emas, data, test_loader, val_loader)
    resume_or_record(fabric, out, state, args)

    figures = None  # of the last epoch, which tests
    log = TrainLog(fabric, args, out, steps_per_epoch * args.grad_accum_steps, preemptible=True)
    for epoch in range(state["epoch"], args.epochs):
        seed_epoch(fabric, args.seed, epoch)
        for student in students:
            student.train()
        log.begin(epoch)
        optimizer.zero_grad(set_to_none=True)
        batches = accumulate(train_loader.epoch(epoch), args.grad_accum_steps, steps_per_epoch)
        resume_mid_epoch(fabric, state, batches, log, args.grad_accum_steps)
        for batch, step, last_of_step, images, labels in batches:
            rate = learning_rate(args, lr, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = rate
            with no_backward_sync(fabric, students, enabled=not last_of_step):
                terms = student_losses(students, images, labels, args)
                loss = sum(terms.values())  # one backward for all students
                fabric.backward(loss / args.grad_accum_steps)
            if last_of_step:
                if args.clip_grad:
                    clip_gradients(fabric, optimizer, students, args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for ema, student in zip(emas, students):
                    ema.update(student.module, step=epoch * steps_per_epoch + step)
            log.step(batch, loss, terms, len(labels))
            if last_of_step and log.stopping:  # SIGTERM or Ctrl-C: save this step and stop
                save_mid_epoch(fabric, out, state, step + 1, log)
        means = log.end()

        tested = evaluates_test(epoch, args.epochs, args.eval_every)  # else the test columns stay empty
        figures = evaluate(students, test_loader if tested else None, fabric, [ema.module for ema in emas])
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **means, **figures}
        score = row["top1_ensemble"]
        if val_loader is not None:  # best.ckpt is chosen on the validation split, never on test
            row.update(evaluate(students, val_loader, fabric, prefix="val_"))
            score = row["val_top1_ensemble"]
        end_epoch(fabric, out, state, row, score, log, curve_panels(args.students))

    # --- results ------------------------------------------------------------
    results = run_results(fabric, args, state, students, emas, data, test_loader, pretrained, figures)
    if args.landscape:
        write_landscapes(fabric, args, out, students, data, test_loader.batch_size)
    if fabric.is_global_zero:
        for k, (name, student) in enumerate(zip(args.students, students)):  # for plain load_state_dict
            save_weights(out / f"student{k}.safetensors", student, name, data, args.patch_size)
            if emas:
                save_weights(out / f"ema{k}.safetensors", emas[k], name, data, args.patch_size)
        write_json(out / "results.json", results)
        print_summary(args, results, out)
    finish(fabric)


def evaluate_checkpoint(fabric, args, out, state, students, emas, data, test_loader, val_loader):
    """--eval: the checkpoint's students (and averages) on the test split, no training."""
    load_for_eval(fabric, args.eval, state)
    state["history"] = []  # the report is of the checkpoint's accuracy, not of its training
    results = run_results(fabric, args, state, students, emas, data, test_loader, [])
    results.update(evaluated=str(args.eval), epochs_trained=state["epoch"], wall_s=None)
    if val_loader is not None:
        results["val_ensemble_top1"] = evaluate(students, val_loader, fabric)["top1_ensemble"]
    if fabric.is_global_zero:
        write_json(Path(out) / EVAL_RESULTS, results)
        print_summary(args, results, out)
    finish(fabric)


def run_results(fabric, args, state, students, emas, data, test_loader, pretrained, figures=None):
    """results.json: each student's top-1 and top-5 (and its EMA copy's), the
    ensemble's, their agreement, and the fit of the training images; `figures`
    (evaluate's, of the last test) are evaluated here when the run did not end with a test."""
    if figures is None:  # resumed a finished run, or --eval
        figures = evaluate(students, test_loader, fabric, [ema.module for ema in emas])
    # without augmentation, on a fixed part of the training images: did the students fit them?
    fit = evaluate(students, make_loader(probe_split(data, args.split_seed), "test", test_loader.batch_size, fabric),
                   fabric)
    history = state["history"]
    return {
        **run_fields(fabric, args, "dml"), "mode": args.mode, "dml_target": args.dml_target,
        "students": [{"name": name, "params": count_parameters(student), "top1": figures[f"top1_{k}"],
                      "top5": figures[f"top5_{k}"], "train_top1": fit[f"top1_{k}"],
                      "distillation_token": has_distillation_token(student),
                      **({"ema_top1": figures[f"ema_top1_{k}"]} if emas else {})}
                     for k, (name, student) in enumerate(zip(args.students, students))],
        "ensemble_top1": figures["top1_ensemble"], "ensemble_top5": figures["top5_ensemble"],
        "agreement": figures["agreement"], "best": best_epoch(state), "extended_from": state.get("extended_from", []),
        "pretrained": pretrained, "train_img_per_s": history[-1]["img_per_s"] if history else None,
        "wall_s": state["wall_s"],
    }


def write_landscapes(fabric, args, out, students, data, batch_size):
    """landscape.csv and .png: each student's loss under Gaussian weight noise, on
    a fixed, class-balanced part of the training set without augmentation."""
    loader = make_loader(probe_split(data, args.seed), "test", batch_size, fabric)
    curves = {f"{k}:{name}": loss_curve(student, loader, fabric, seed=args.seed)
              for k, (name, student) in enumerate(zip(args.students, students))}
    if fabric.is_global_zero:
        write_landscape_csv(out / "landscape.csv", curves)
        plot_landscape(out / "landscape.png", {args.mode: curves})


def print_summary(args, results, out):
    print(f"\n{args.mode} on {args.dataset}, {args.epochs} epochs -> {out}")
    print(f"{'student':<20}{'params':>10}{'top-1':>8}{'top-5':>8}")
    for k, student in enumerate(results["students"]):
        print(f"{f'{k}: ' + student['name']:<20}{student['params'] / 1e6:>9.2f}M"
              f"{student['top1']:>8.2f}{student['top5']:>8.2f}")
    print(f"{'ensemble':<20}{'':>10}{results['ensemble_top1']:>8.2f}{results['ensemble_top5']:>8.2f}")
    if results["train_img_per_s"] is not None:
        print(f"train {results['train_img_per_s']:.0f} img/s, wall {results['wall_s']:.0f} s")


if __name__ == "__main__":
    exit_on_user_error(main, parse_args())
