"""DeiT: a ViT student with a distillation token, distilled from a frozen CNN teacher.

Touvron et al., "Training data-efficient image transformers & distillation
through attention", ICML 2021 (seeds 001, 003). The student has a class token
and a distillation token, each with its own head. The class head learns from
the label, the distillation head from the teacher (`--distillation-type`):

    none:  CE(ψ(Z_s), y)                                      (no teacher)
    soft:  (1-λ)·CE(ψ(Z_s), y) + λ·τ²·KL(ψ(Z_t/τ) ‖ ψ(Z_s^dist/τ))
    hard:  (1-λ)·CE(ψ(Z_s), y) + λ·CE(ψ(Z_s^dist), y_t),  y_t = argmax Z_t   (λ = ½: the paper's)

The teacher is frozen (in the run's autocast dtype; compiled with `--compile`)
and sees the same augmented, mixed batch as the student, so y_t is its decision
on this very image. The student predicts with the average of its two heads;
each head alone is reported too. A ViT or CNN student (an ablation) gets both
terms on its only head; a DeiT trained with `none` learns from the label with
both heads (their CEs averaged).

Recipe (the paper's defaults): AdamW, lr 5e-4 × batch/512, weight decay 0.05,
cosine schedule, 5 warm-up epochs, 300 epochs, batch 1024, drop-path 0.1,
label smoothing 0.1; `--recipe deit` adds RandAugment rand-m9-mstd0.5-inc1,
Mixup 0.8, CutMix 1.0, Random Erasing 0.25 and repeated augmentation ×3 (the
default for ImageFolder), `--recipe cifar` random crop with padding + flip
(the default for CIFAR-sized data), `--recipe none` nothing.

    # 1. a teacher, trained by this script without distillation
    python deit.py --model resnet56 --distillation-type none --recipe cifar --out runs/teacher
    # 2. the DeiT student, distilled from it
    fabric run deit.py --model deit_tiny --teacher resnet56 \\
        --teacher-ckpt runs/teacher/last.ckpt --distillation-type hard
    # ImageNet, as in the paper, with a teacher whose weights you downloaded
    fabric run --devices 8 --precision bf16-mixed deit.py --dataset imagefolder \\
        --data-dir /data/imagenet --model deit_small --teacher regnety_160 \\
        --teacher-ckpt regnety_160.pth --distillation-type hard

Expect (the paper, ImageNet top-1, no distillation -> hard): Ti 72.2 -> 74.5,
S 79.9 -> 81.2, B 81.8 -> 83.4; hard > soft > none.
"""
import argparse

import torch
from timm.utils import ModelEmaV3

from common.data import PADDING, SMALL_SIDE, add_data_flags, load_run_data, make_loader, probe_split
from common.folder import (EVAL_RESULTS, best_epoch, end_epoch, load_for_eval, resume_or_record, run_fields, start_run,
                           write_json)
from common.launch import (HelpFormatter, UserError, add_run_flags, check_fraction, check_shared_flags,
                           exit_on_user_error, finish, inference_dtype, note_without_effect, parse_with_config,
                           require_positive)
from common.loop import (TrainLog, accumulate, clip_gradients, cosine_schedule, evaluates_test,
                         optimizer_steps, peak_lr, resume_mid_epoch, save_mid_epoch, seed_epoch)
from common.losses import cross_entropy, hard_distillation_loss, soft_distillation_loss
from common.models import (add_model_module_flag, both_heads, count_parameters, create_model, describe_pretrained,
                           freeze, has_distillation_token, import_model_modules, load_pretrained, load_teacher,
                           model_name_in, save_weights, split_heads, weight_decay_groups)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default="deit_tiny", help="the student: deit_*, vit_*, resnet<depth> or a timm name")
    parser.add_argument("--teacher", help="the teacher's model name (default: the one a checkpoint of this "
                                          "project was made for; needed for a bare .pth)")
    parser.add_argument("--teacher-ckpt", help="the teacher's weights: a run folder's .ckpt, a .pth or .safetensors")
    parser.add_argument("--distillation-type", choices=["none", "soft", "hard"], default="none",
                        help="what the distillation head learns from (hard: the paper's best)")
    parser.add_argument("--distillation-alpha", type=float, default=0.5, help="λ, the weight of the distillation term")
    parser.add_argument("--distillation-tau", type=float, default=1.0, help="τ, the temperature of soft distillation")
    parser.add_argument("--recipe", choices=["deit", "cifar", "none"],
                        help="augmentation (default: deit for ImageFolder, cifar for CIFAR-sized data)")
    parser.add_argument("--randaugment", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy (recipe deit)")
    parser.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (recipe deit; 0: off)")
    parser.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (recipe deit; 0: off)")
    parser.add_argument("--reprob", type=float, default=0.25, help="Random Erasing probability (recipe deit)")
    parser.add_argument("--repeated-aug", type=int, default=3, help="repeated augmentation count (recipe deit; 1: off)")
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing of the CE")
    parser.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    parser.add_argument("--patch-size", type=int, help="ViT patch size (default: 4 up to 64 pixels, else 16)")
    add_data_flags(parser)
    parser.add_argument("--epochs", type=int, default=300, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=1024, help="batch size over all devices")
    parser.add_argument("--grad-accum-steps", type=int, default=1,
                        help="accumulate this many batches per optimizer step (the effective batch is their sum)")
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="peak learning rate for an effective batch of 512 (scaled linearly with it)")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up (at most a fifth of the run)")
    parser.add_argument("--clip-grad", type=float, help="clip the gradient norm to this (default: off)")
    parser.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the student")
    parser.add_argument("--model-ema-decay", type=float, default=0.99996,
                        help="its decay per step (DeiT's), reached after a warm-up (timm's use_warmup)")
    add_model_module_flag(parser)
    parser.add_argument("--pretrained", help="start the student from this local weights file, loaded as timm does")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="evaluate the test split every N epochs and at the last (validation: every epoch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentation")
    add_run_flags(parser, "deit", "the student and the teacher", extend=True)
    args = parse_with_config(parser, argv, script="deit")
    args.recipe = args.recipe or ("deit" if args.dataset == "imagefolder" else "cifar")
    if args.recipe != "deit":
        note_without_effect(args, parser.parse_args([]), ["randaugment", "mixup", "cutmix", "reprob", "repeated_aug"],
                            "without --recipe deit")
    return args


def check_args(args):
    check_shared_flags(args)  # --teacher-ckpt among them: a file
    distilling = args.distillation_type != "none"
    if distilling and args.teacher_ckpt and not args.teacher:
        args.teacher = model_name_in(args.teacher_ckpt)  # a checkpoint of this project knows its model
    if distilling and args.teacher_ckpt and not args.teacher:
        raise UserError(f"--teacher-ckpt {args.teacher_ckpt} is not a readable checkpoint of this project: if it is a "
                        f"weights file, name its model with --teacher")
    if distilling and not (args.teacher and args.teacher_ckpt):
        raise UserError(f"--distillation-type {args.distillation_type} needs --teacher-ckpt (and --teacher for a "
                        f"weights file that is not one of this project's checkpoints)")
    if not distilling and (args.teacher or args.teacher_ckpt):
        given = " and ".join(flag for flag, value in (("--teacher", args.teacher),
                                                      ("--teacher-ckpt", args.teacher_ckpt)) if value)
        raise UserError(f"{given} {'is' if ' and ' not in given else 'are'} used only with --distillation-type soft "
                        f"or hard")
    check_fraction("distillation_alpha", args.distillation_alpha, high_included=True)
    if args.recipe == "deit":
        from timm.data.auto_augment import rand_augment_transform
        try:
            rand_augment_transform(args.randaugment, {})
        except (AssertionError, ValueError, IndexError, KeyError):
            raise UserError(f"--randaugment {args.randaugment}: not a timm RandAugment policy "
                            f"(such as rand-m9-mstd0.5-inc1)") from None
    require_positive(distillation_tau=args.distillation_tau, repeated_aug=args.repeated_aug)
    unused = [name for name, used in (("distillation_alpha", distilling),
                                      ("distillation_tau", args.distillation_type == "soft")) if not used]
    note_without_effect(args, parse_args([]), unused, f"with --distillation-type {args.distillation_type}")


def training_batches(args, data, fabric, batch_size):
    """The training loader of --recipe and, for deit, its batch-level Random
    Erasing and Mixup/CutMix (else None). deit is split where each part runs best:
    per image in DataLoader workers (crop, flip, RandAugment: timm's works on PIL
    images; --repeated-aug), per batch on the device (erasing, Mixup/CutMix with
    soft targets); cifar: crop + flip on the device; none: only resized."""
    from timm.data import Mixup, create_transform
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing

    if args.recipe != "deit":
        return make_loader(data, "train", batch_size, fabric, args.seed, augment=args.recipe == "cifar",
                           workers=args.workers), None, None
    if (args.mixup > 0 or args.cutmix > 0) and batch_size % 2:  # timm's Mixup pairs each image with its mirror
        raise UserError(f"Mixup/CutMix need an even batch per device, got {batch_size} (--batch-size "
                        f"{args.batch_size} over {fabric.world_size} devices); change --batch-size or set "
                        f"--mixup 0 --cutmix 0")
    size, mean, std = data["img_size"], data["mean"], data["std"]
    if size <= SMALL_SIDE:  # CIFAR-sized: crop with padding instead of random resized crop
        import torchvision.transforms as T

        transform = T.Compose([
            T.Resize(size), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(),
            rand_augment_transform(args.randaugment, {"img_mean": tuple(round(255 * m) for m in mean)}),
            T.ToTensor(), T.Normalize(mean, std)])
    else:
        transform = create_transform(size, is_training=True, auto_augment=args.randaugment, mean=mean, std=std,
                                     re_prob=0.0)
    erase = RandomErasing(args.reprob, mode="pixel", device=fabric.device) if args.reprob > 0 else None
    mixup = (Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                   num_classes=len(data["classes"])) if args.mixup > 0 or args.cutmix > 0 else None)
    return make_loader(data, "train", batch_size, fabric, args.seed, transform, args.repeated_aug,
                       workers=args.workers), erase, mixup


# --- training and evaluation -------------------------------------------------


def frozen_teacher(args, fabric, num_classes, test_loader):
    """--teacher from --teacher-ckpt, frozen for inference on the device (not set
    up by Fabric: it has nothing to train), and its figures on the test split:
    (decisions, top-1). (None, (None, None)) without a teacher."""
    if not args.teacher:
        return None, (None, None)
    teacher = load_teacher(args.teacher, args.teacher_ckpt, num_classes, args.img_size, device=fabric.device)
    teacher = freeze(teacher, inference_dtype(fabric), args.compile)
    decisions, top1 = teacher_predictions(teacher, test_loader, fabric)
    fabric.print(f"teacher {args.teacher}: top-1 {top1.item():.2f} % on the test split")
    return teacher, (decisions, top1.item())


def student_loss(output, teacher_logits, targets, args):
    """DeiT's terms on one batch, by name, weighted so that they sum to the loss:
    `ce`, (1-λ)·CE of the class head, and `distill`, λ·the distillation head's loss
    (soft: τ²·KL to the teacher; hard: CE with its decision). `targets` are labels
    or Mixup's soft targets. Without a teacher, `ce` alone (over all heads)."""
    class_logits, distill_logits = split_heads(output)
    if args.distillation_type == "none":
        heads = output if isinstance(output, tuple) else (output,)
        return {"ce": sum(cross_entropy(head, targets, args.smoothing) for head in heads) / len(heads)}
    ce = cross_entropy(class_logits, targets, args.smoothing)
    if args.distillation_type == "soft":
        distill = soft_distillation_loss(distill_logits, teacher_logits, args.distillation_tau)
    else:
        distill = hard_distillation_loss(distill_logits, teacher_logits)
    alpha = args.distillation_alpha
    return {"ce": (1 - alpha) * ce, "distill": alpha * distill}


CURVE_PANELS = [  # what curves.png draws
    ("training loss", [("loss", "total"), ("loss_ce", "(1-λ)·class head CE"),
                       ("loss_distill", "λ·distillation term")]),
    ("top-1 (%)", [("top1", "prediction (both heads)"), ("top1_cls", "class head"), ("top1_dist", "distillation head"),
                   ("teacher_agreement", "agreement with the teacher"), ("val_top1", "prediction (validation)"),
                   ("ema_top1", "EMA"), ("teacher_disagreement", "teacher ≠ label on training views")]),
    ("learning rate", [("lr", "lr")])]


@torch.no_grad()
def teacher_predictions(teacher, loader, fabric):
    """The teacher's decisions on the test batches (fixed, so made once) and its top-1 (%)."""
    decisions = []
    counts = torch.zeros(2, device=fabric.device)  # correct, seen
    dtype = next(teacher.parameters()).dtype
    for images, labels in loader.epoch():
        decisions.append(teacher(images.to(dtype)).argmax(1))
        counts += torch.stack([(decisions[-1] == labels).sum(), (labels != PADDING).sum()])
    counts = fabric.all_reduce(counts, reduce_op="sum")
    return decisions, 100 * counts[0] / counts[1]


@torch.no_grad()
def evaluate(model, loader, fabric, teacher_decisions=None, ema=None, prefix=""):
    """One evaluation's columns, named as in metrics.csv (after `prefix`): the top-1
    (%) of the prediction (the heads' average, `top1`), of the class and the
    distillation head (`top1_cls`, `top1_dist`), the prediction's agreement (%) with
    the teacher's `teacher_decisions` (`teacher_agreement`, with them) and the
    top-1 of the EMA copy `ema` (`ema_top1`, with one): one pass over the data.
    Without a `loader` (an epoch without a test) the same columns, empty."""
    every = ["top1", "top1_cls", "top1_dist", "teacher_agreement", "ema_top1"]  # in the order of `counts`
    measured = [True, True, True, teacher_decisions is not None, ema is not None]
    columns = [column for column, kept in zip(every, measured) if kept]
    if loader is None:
        return {prefix + column: None for column in columns}
    for network in (model, ema):
        if network is not None:
            network.eval()
    counts = torch.zeros(6, device=fabric.device)  # prediction, class head, distillation head, agreement, EMA, seen
    for batch, (images, labels) in enumerate(loader.epoch()):
        with fabric.autocast():  # autocast for the EMA copy, which Fabric does not wrap
            predicted, class_logits, distill_logits = predict(model, images)
            if ema is not None:
                counts[4] += (predict(ema, images)[0] == labels).sum()
        real = labels != PADDING
        counts[0] += (predicted == labels).sum()
        counts[1] += (class_logits.argmax(1) == labels).sum()
        counts[2] += (distill_logits.argmax(1) == labels).sum()
        if teacher_decisions is not None:
            counts[3] += ((teacher_decisions[batch] == predicted) & real).sum()
        counts[5] += real.sum()
    counts = fabric.all_reduce(counts, reduce_op="sum")
    figures = dict(zip(every, (100 * counts[:5] / counts[5]).tolist()))
    return {prefix + column: figures[column] for column in columns}


def predict(model, images):
    """The class predicted from the heads' average, and the two heads' logits."""
    with both_heads(model):
        class_logits, distill_logits = split_heads(model(images))
    return (class_logits.float() + distill_logits.float()).argmax(1), class_logits, distill_logits


def learning_rate(args, lr, epoch, step, steps_per_epoch):
    """The rate at this step: a linear warm-up over --warmup-epochs, then a cosine
    down to --min-lr (timm's per-step schedule, as DeiT trains)."""
    return cosine_schedule(lr, args.min_lr, args.epochs, args.warmup_epochs, epoch, step, steps_per_epoch)


def main(args):
    import_model_modules(args.model_module)
    check_args(args)
    fabric, out = start_run(args, "deit")

    data = load_run_data(fabric, args)
    num_classes = len(data["classes"])
    per_device_batch = max(1, args.batch_size // fabric.world_size)
    train_loader, erase, mixup = training_batches(args, data, fabric, per_device_batch)
    test_loader = make_loader(data, "test", per_device_batch, fabric, workers=args.workers)
    val_loader = make_loader(data, "val", per_device_batch, fabric, workers=args.workers) if args.val_split else None

    teacher, teacher_figures = frozen_teacher(args, fabric, num_classes, test_loader)  # (decisions, top-1)

    model = create_model(args.model, num_classes, args.img_size, args.patch_size, args.drop_path, fabric.device)
    pretrained = [load_pretrained(model, args.pretrained)] if args.pretrained else []
    if pretrained:
        fabric.print(describe_pretrained(pretrained[0]))
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=True) if args.model_ema else None
    lr = peak_lr(args)  # --lr is for a batch of 512
    # norms, biases, position embeddings and tokens get no weight decay, as in timm and DeiT
    optimizer = torch.optim.AdamW(weight_decay_groups(model, args.weight_decay), lr=lr)
    model, optimizer = fabric.setup(torch.compile(model) if args.compile else model, optimizer)
    steps_per_epoch = optimizer_steps(train_loader, args.grad_accum_steps)

    state = {"model": model, **({"ema": ema} if ema is not None else {})}
    state.update(optimizer=optimizer, epoch=0, history=[], best_top1=-1.0, wall_s=0.0)
    if args.eval:
        return evaluate_checkpoint(fabric, args, out, state, data, test_loader, teacher_figures, pretrained)
    resume_or_record(fabric, out, state, args)

    figures = None  # of the last epoch, which tests
    log = TrainLog(fabric, args, out, steps_per_epoch * args.grad_accum_steps, preemptible=True)
    for epoch in range(state["epoch"], args.epochs):
        seed_epoch(fabric, args.seed, epoch)
        model.train()
        log.begin(epoch)
        optimizer.zero_grad(set_to_none=True)
        batches = accumulate(train_loader.epoch(epoch), args.grad_accum_steps, steps_per_epoch)
        resume_mid_epoch(fabric, state, batches, log, args.grad_accum_steps)
        for batch, step, last_of_step, images, labels in batches:
            rate = learning_rate(args, lr, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = rate
            targets = labels
            if erase is not None:
                images = erase(images)
            if mixup is not None:
                images, targets = mixup(images, labels)
            teacher_logits = None
            if teacher is not None:  # the teacher sees the same, mixed batch
                with torch.no_grad():
                    teacher_logits = teacher(images.to(next(teacher.parameters()).dtype))
            with fabric.no_backward_sync(model, enabled=not last_of_step):
                terms = student_loss(model(images), teacher_logits, targets, args)
                loss = sum(terms.values())
                fabric.backward(loss / args.grad_accum_steps)
            if last_of_step:
                if args.clip_grad:
                    clip_gradients(fabric, optimizer, [model], args.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model.module, step=epoch * steps_per_epoch + step)
            diagnostics = {}
            if teacher is not None:  # on how many views the hard head learns something other than the label (%)
                view_labels = targets.argmax(1) if targets.ndim == 2 else targets  # the larger part of a mixed view
                diagnostics["teacher_disagreement"] = 100 * (teacher_logits.argmax(1) != view_labels).float().mean()
            log.step(batch, loss, terms, len(labels), **diagnostics)
            if last_of_step and log.stopping:  # SIGTERM or Ctrl-C: save this step and stop
                save_mid_epoch(fabric, out, state, step + 1, log)
        means = log.end()

        tested = evaluates_test(epoch, args.epochs, args.eval_every)  # else the test columns stay empty
        figures = evaluate(model, test_loader if tested else None, fabric, teacher_figures[0], ema and ema.module)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **means, **figures}
        score = row["top1"]
        if val_loader is not None:  # best.ckpt is chosen on the validation split, never on test
            row.update(evaluate(model, val_loader, fabric, prefix="val_"))
            score = row["val_top1"]
        end_epoch(fabric, out, state, row, score, log, CURVE_PANELS)

    # --- results ------------------------------------------------------------
    results = run_results(fabric, args, state, data, test_loader, teacher_figures, pretrained, figures)
    if fabric.is_global_zero:
        save_weights(out / "model.safetensors", model, args.model, data, args.patch_size)  # for load_state_dict
        if ema is not None:
            save_weights(out / "ema.safetensors", ema, args.model, data, args.patch_size)
        write_json(out / "results.json", results)
        print_summary(args, results, out)
    finish(fabric)


def evaluate_checkpoint(fabric, args, out, state, data, test_loader, teacher_figures, pretrained):
    """--eval: the checkpoint's student (and its EMA copy) on the test split, no training."""
    load_for_eval(fabric, args.eval, state)
    state["history"] = []  # the report is of the checkpoint's accuracy, not of its training
    results = run_results(fabric, args, state, data, test_loader, teacher_figures, pretrained)
    results.update(evaluated=str(args.eval), epochs_trained=state["epoch"], wall_s=None)
    if fabric.is_global_zero:
        write_json(out / EVAL_RESULTS, results)
        print_summary(args, results, out)
    finish(fabric)


def run_results(fabric, args, state, data, test_loader, teacher_figures, pretrained, figures=None):
    """results.json: the student's top-1 (of the prediction and of each head), its
    EMA copy's, the teacher's and their agreement, and the fit of the training
    images; `figures` (evaluate's, of the last test) are evaluated here when the run
    did not end with a test."""
    model, ema = state["model"], state.get("ema")
    if figures is None:  # resumed a finished run, or --eval
        figures = evaluate(model, test_loader, fabric, teacher_figures[0], ema and ema.module)
    distilled = has_distillation_token(model)
    # without augmentation, on a fixed part of the training images: did the student fit them?
    probe = make_loader(probe_split(data, args.split_seed), "test", test_loader.batch_size, fabric)
    history = state["history"]
    return {
        **run_fields(fabric, args, "deit"), "model": args.model, "teacher": args.teacher,
        "distillation_type": args.distillation_type, "recipe": args.recipe, "params": count_parameters(model),
        "top1": figures["top1"], "top1_cls": figures["top1_cls"] if distilled else None,
        "top1_dist": figures["top1_dist"] if distilled else None, "teacher_top1": teacher_figures[1],
        "teacher_agreement": figures.get("teacher_agreement"), "train_top1": evaluate(model, probe, fabric)["top1"],
        "teacher_disagreement": history[-1].get("teacher_disagreement") if history else None,
        "best": best_epoch(state), "extended_from": state.get("extended_from", []), "pretrained": pretrained,
        "ema_top1": figures.get("ema_top1"),
        "train_img_per_s": history[-1]["img_per_s"] if history else None, "wall_s": state["wall_s"],
    }


def print_summary(args, results, out):
    print(f"\n{args.model} ({args.distillation_type} distillation{f' from {args.teacher}' if args.teacher else ''}) "
          f"on {args.dataset}, {args.epochs} epochs -> {out}")
    heads = (f" (class head {results['top1_cls']:.2f}, distillation head {results['top1_dist']:.2f})"
             if results["top1_cls"] is not None else "")
    print(f"top-1 {results['top1']:.2f}{heads}")
    if args.teacher:
        print(f"teacher top-1 {results['teacher_top1']:.2f}, agreement {results['teacher_agreement']:.2f}")
    if results["train_img_per_s"] is not None:
        print(f"train {results['train_img_per_s']:.0f} img/s, wall {results['wall_s']:.0f} s")


if __name__ == "__main__":
    exit_on_user_error(main, parse_args())
