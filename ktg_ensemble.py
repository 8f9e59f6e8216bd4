"""Knowledge Transfer Graph ensembles: networks that teach each other along a graph, and the search for it.

Minami et al., "Knowledge Transfer Graph for Deep Collaborative Learning", ACCV
2020; Okamoto et al., diverse distillation for ensembles (seed 002). M network
nodes, the label and an ensemble node (the mean of the nodes' logits, eq. 5).
Each edge s → t adds to node t's loss, the source detached (Fig. 1(c)):

    L_{s,t}(x) = G_{s,t}(L_p(x) + L_map(x))                                (eq. 6)

L_p attracts (KL, eq. 1) or repels (cosine similarity, eq. 2) the class
probabilities; L_map attracts (squared distance, eq. 3) or repels (cosine, eq. 4)
crops of the Attention Branch Networks' maps, cut around the source map's peak
(`--crop-sizes`). Six loss types: prob, att or both, each attract or repel. The
gate G is through, cutoff, linear (k/K) or correct (only samples the source
gets right). Label edges are CE (an ABN's own loss: CE on both branches).

`--graph dml` and `--graph independent` are presets; a JSON file (see
common/graph.py) gives any graph. `--search N` samples the loss type and gate of
every edge at random (Optuna's random sampler), trains each graph, reports the
ensemble's error on `--val-split` of the training set (0.2, held out by
`--split-seed`: the same images for every worker) every epoch, and prunes by
successive halving, as the authors' code does. Workers share a study through
`--storage`; then the best graph is retrained on the rest of the training set,
best.ckpt chosen on the same held-out part, and tested once.

Recipe (the authors' CIFAR code): SGD with Nesterov momentum 0.9, lr 0.1 at batch
64 (scaled with `--batch-size`), weight decay 5e-4, 200 epochs, each node its own
optimizer (here its own parameter group of one optimizer: the same update). The
schedule is theirs too, lr ÷10 at epochs 60, 120 and 180 (scaled
with `--epochs`): a step schedule, so that graphs searched and retrained here
compare with the paper's. One addition, a linear warm-up over the first epoch:
without it the `dml` preset of three resnet20_abn on cifar10-mini blew up in its
first steps (loss 4.9 → 14.8 at step 4, two nodes at chance after epoch 1) and
reached only 27.9 % in 10 epochs, against 55.6 % for `independent`.

    python ktg_ensemble.py --nodes resnet20_abn resnet20_abn resnet20_abn --graph dml
    python ktg_ensemble.py --nodes resnet20_abn resnet20_abn resnet20_abn --search 200
    python ktg_ensemble.py --graph runs/ktg/search/best_graph.json --dataset imagefolder --data-dir /data/dogs
    fabric run --devices 4 ktg_ensemble.py --graph dml --nodes resnet18_abn resnet18_abn resnet18_abn \\
        --dataset imagefolder --data-dir /data/dogs

Expect (seed 002, Stanford Dogs, ABN × 3, ensemble top-1): Independent 71.41,
DML 72.08, the searched graph 73.41.
"""
import argparse
import os

import torch

from common.data import PADDING, DeviceLoader, add_data_flags, load_run_data, make_loader, probe_split
from common.folder import (EVAL_RESULTS, end_epoch, load_checkpoint, load_for_eval, run_fields, start_run, write_csv,
                           write_json)
from common.graph import (LABEL, LOSSES, check_graph, draw_attention, draw_graph, load_graph, preset, sample_graph,
                          untrained_nodes)
from common.launch import (HelpFormatter, UserError, add_run_flags, check_shared_flags, exit_on_user_error, finish,
                           note_without_effect, on_rank_zero, parse_with_config, require_positive)
from common.loop import TrainLog, evaluates_test, seed_epoch, step_schedule
from common.losses import edge_loss, gate, label_loss
from common.models import (ABN_ALIASES, add_model_module_flag, agreeing_pairs, count_parameters, create_model,
                           describe_pretrained, import_model_modules, load_pretrained, save_weights)
from common.study import best_trial, open_study, run_trials, search_picture, storage_url, trial_rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--nodes", nargs="+", help="the network nodes (default: the graph file's, else "
                                                   "resnet20_abn × 3); attention losses need *_abn models")
    parser.add_argument("--graph", default="dml", help="independent, dml, or a graph JSON file")
    parser.add_argument("--crop-sizes", type=int, nargs="+", default=[3, 7, 11],
                        help="attention crops around the source map's peak")
    parser.add_argument("--search", type=int, default=0, help="search this many graphs (0: train --graph)")
    parser.add_argument("--storage", help="Optuna storage URL shared by search workers, e.g. "
                                          "postgresql+psycopg://user:password@host:5432/db (default: SQLite in --out)")
    parser.add_argument("--study-name", default="ktg", help="the Optuna study in --storage")
    parser.add_argument("--heartbeat-grace", type=int, default=15,
                        help="seconds without a heartbeat after which a worker's trial counts as failed")
    add_data_flags(parser, "scores the search trials and chooses best.ckpt (default: 0.2 with --search, else 0: off)",
                   val_split_default=None)
    parser.add_argument("--epochs", type=int, default=200, help="training epochs (of every search trial too)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size over all devices")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate for batch 64 (scaled by batch/64)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--warmup-epochs", type=float, default=1, help="linear warm-up of the learning rate")
    add_model_module_flag(parser)
    parser.add_argument("--pretrained", nargs="+",
                        help="local weights file(s), one for all nodes or one each, loaded as timm does")
    parser.add_argument("--eval-every", type=int, default=1, help="test every N epochs and at the last")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order, augmentation and "
                                                            "sampler (give each search worker its own)")
    add_run_flags(parser, "ktg", "the nodes")
    return parse_with_config(parser, argv, script="ktg_ensemble")


def check_args(args):
    require_positive(heartbeat_grace=args.heartbeat_grace)
    if args.search < 0:
        raise UserError(f"--search must be a number of trials, got {args.search}")
    if args.val_split is None:
        args.val_split = 0.2 if args.search else 0.0
    check_shared_flags(args)
    if args.search and not args.val_split:
        raise UserError("--search scores its trials on held-out training images: --val-split must be above 0")
    if args.search and args.graph != "dml":
        print(f"note: --graph {args.graph} has no effect with --search (the search samples the graphs)")
    if not args.search:
        note_without_effect(args, parse_args([]), ["storage", "study_name", "heartbeat_grace"], "without --search")
    if any(size < 1 for size in args.crop_sizes):
        raise UserError(f"--crop-sizes must be positive, got {args.crop_sizes}")
    if args.graph in ("independent", "dml"):
        graph = check_graph(preset(args.graph, args.nodes or ["resnet20_abn"] * 3))
    else:
        graph = load_graph(args.graph, args.nodes)  # checked as it loads
    if not args.search and not any(edge["source"] == LABEL and edge["gate"] != "cutoff" for edge in graph["edges"]):
        print("note: no edge of the graph comes from the label: the nodes learn only from each other")
    attention = [edge for edge in graph["edges"] if edge["loss"].startswith(("att", "both"))]
    if not args.search and not attention and args.crop_sizes != parse_args([]).crop_sizes:
        print("note: --crop-sizes has no effect: no edge of the graph has an attention loss")
    for edge in graph["edges"]:
        if edge["loss"].startswith(("att", "both")):
            for end in (edge["source"], edge["target"]):
                if graph["nodes"][end] not in ABN_ALIASES:
                    raise UserError(f"edge {edge}: attention losses need attention maps, but node {end} is "
                                    f"{graph['nodes'][end]}, not an *_abn model")
    return graph


def learning_rate(args, epoch, step, steps_per_epoch):
    """The authors' step schedule, ÷10 at epochs 60, 120 and 180 of 200 (scaled to
    --epochs), after a linear warm-up over the first --warmup-epochs."""
    milestones = [round(args.epochs * f) for f in (0.3, 0.6, 0.9)]
    return step_schedule(args.lr * args.batch_size / 64, epoch, step, steps_per_epoch, milestones,
                         args.warmup_epochs)


# --- training and evaluation -------------------------------------------------


def node_outputs(node, images):
    """(logits, attention logits, attention map) of a node; the last two None without an attention branch."""
    output = node(images)
    return output if isinstance(output, tuple) else (output, None, None)


def graph_loss(graph, outputs, labels, step, total_steps, crop_sizes):
    """Eq. 6 by node: `node_m` is the sum of node m's incoming edges, gated. Every
    source is detached, so a node's term trains that node only, and the sum of
    the terms can go through one backward."""
    correct = [logits.argmax(1) == labels for logits, _, _ in outputs]
    # Every parameter joins the backward (zero gradient at least), as DDP needs,
    # even in a node whose edges are all cut off.
    terms = {f"node_{m}": 0.0 * sum(t.float().sum() for t in output if t is not None)
             for m, output in enumerate(outputs)}
    for edge in graph["edges"]:
        if edge["gate"] == "cutoff":
            continue  # G = 0: nothing to compute
        target, source = edge["target"], edge["source"]
        logits, attention_logits, attention = outputs[target]
        if source == LABEL:
            per_sample = label_loss(logits, attention_logits, labels)
            source_correct = torch.ones_like(correct[target])
        else:
            source_logits, _, source_attention = outputs[source]
            per_sample = edge_loss(edge["loss"], (source_logits, source_attention), (logits, attention), crop_sizes)
            source_correct = correct[source]
        terms[f"node_{target}"] = terms[f"node_{target}"] + gate(edge["gate"], per_sample, step, total_steps,
                                                                 source_correct.float())
    return terms


def curve_panels(nodes):
    """What curves.png draws: the loss per node, each node's and the ensemble's top-1, their agreement, the lr."""
    accuracy = [(f"top1_{m}", f"{m}: {name}") for m, name in enumerate(nodes)]
    accuracy += [("top1_ensemble", "ensemble"), ("agreement", "agreement of the nodes")]
    accuracy += [(f"val_{column}", f"{label} (validation)") for column, label in accuracy]
    losses = [("loss", "graph loss")] + [(f"loss_node_{m}", f"{m}: {name}") for m, name in enumerate(nodes)]
    return [("training loss (per node)", losses), ("top-1, agreement (%)", accuracy),
            ("learning rate", [("lr", "lr")])]


@torch.no_grad()
def evaluate(nodes, loader, fabric, prefix=""):
    """`top1_<m>` of each node, `top1_ensemble` (their mean logits, eq. 5), `agreement` (the images two nodes
    classify alike, mean over the pairs), in %, after `prefix`; all None without a `loader` (a skipped split)."""
    names = [f"{prefix}top1_{m}" for m in range(len(nodes))] + [f"{prefix}top1_ensemble", f"{prefix}agreement"]
    if loader is None:
        return dict.fromkeys(names)
    for node in nodes:
        node.eval()
    counts = torch.zeros(len(nodes) + 3, device=fabric.device)  # correct per node and ensemble, agreeing, images
    for images, labels in loader.epoch():
        logits = [node_outputs(node, images)[0].float() for node in nodes]
        correct = [(scores.argmax(1) == labels).sum() for scores in [*logits, torch.stack(logits).mean(0)]]
        counts += torch.stack([*correct, agreeing_pairs(logits, labels), (labels != PADDING).sum()])
    counts = fabric.all_reduce(counts, reduce_op="sum")
    return dict(zip(names, (100 * counts[:-1] / counts[-1]).tolist()))


def train_graph(graph, data, fabric, args, out=None, report=None):
    """Train the graph's nodes together, evaluating on data["val"], if held out (it then chooses best.ckpt), after
    every epoch, and on data["test"] every --eval-every epochs. With `out`: checkpoints, metrics and --resume.
    Without, a search trial: `report(epoch, error)` receives the ensemble's validation error (the trial prunes
    there) and the test split is never read. Returns the nodes, the last evaluation (a row) and the state."""
    per_device_batch = max(1, args.batch_size // fabric.world_size)
    train_loader = make_loader(data, "train", per_device_batch, fabric, args.seed, workers=args.workers)
    test_loader = make_loader(data, "test", per_device_batch, fabric, workers=args.workers) if out else None
    val_loader = make_loader(data, "val", per_device_batch, fabric, workers=args.workers) if "val" in data else None
    torch.manual_seed(args.seed)  # every graph starts from the same weights
    models = [create_model(name, len(data["classes"]), args.img_size, device=fabric.device) for name in graph["nodes"]]
    pretrained = [load_pretrained(model, args.pretrained[m % len(args.pretrained)])
                  for m, model in enumerate(models)] if args.pretrained else []
    for m, loaded in enumerate(pretrained if out is not None else []):  # a search trial prints none
        fabric.print(f"node {m}: {describe_pretrained(loaded)}")
    models = [torch.compile(model) if args.compile else model for model in models]
    # one optimizer, a parameter group per node: the same update as one optimizer each
    optimizer = torch.optim.SGD([{"params": model.parameters()} for model in models], lr=args.lr, momentum=0.9,
                                nesterov=True, weight_decay=args.weight_decay)
    nodes = [fabric.setup_module(model) for model in models]
    optimizer = fabric.setup_optimizers(optimizer)

    state = {f"node{m}": node for m, node in enumerate(nodes)}
    state.update(optimizer=optimizer, epoch=0, history=[], best_top1=-1.0, wall_s=0.0, args=vars(args), graph=graph,
                 pretrained=pretrained)
    if out is not None and args.eval:
        load_for_eval(fabric, args.eval, state)
    elif out is not None and args.resume and on_rank_zero(fabric, (out / "last.ckpt").is_file()):
        load_checkpoint(fabric, out / "last.ckpt", state, args)
        if state["graph"] != graph:
            raise UserError(f"cannot resume {out / 'last.ckpt'}: it trained another graph")
        fabric.print(f"resuming {out} at epoch {state['epoch']}")

    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    row = None
    log = TrainLog(fabric, args, out, steps_per_epoch)
    for epoch in range(state["epoch"], args.epochs if not args.eval else 0):
        seed_epoch(fabric, args.seed, epoch)
        for node in nodes:
            node.train()
        log.begin(epoch)
        for step, (images, labels) in enumerate(train_loader.epoch(epoch)):
            rate = learning_rate(args, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = rate
            outputs = [node_outputs(node, images) for node in nodes]
            terms = graph_loss(graph, outputs, labels, epoch * steps_per_epoch + step + 1, total_steps,
                               args.crop_sizes)
            loss = sum(terms.values())
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.step(step, loss, terms, len(labels))
        means = log.end()

        due = test_loader is not None and evaluates_test(epoch, args.epochs, args.eval_every)
        # a skipped test leaves its columns empty (None), from the first row on, which names metrics.csv's columns
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **means,
               **evaluate(nodes, test_loader if due else None, fabric)}
        if val_loader is not None:  # best.ckpt is chosen on the validation split, never on test
            row.update(evaluate(nodes, val_loader, fabric, prefix="val_"))
        score = row["val_top1_ensemble" if val_loader is not None else "top1_ensemble"]  # None: not evaluated
        if out is not None:
            end_epoch(fabric, out, state, row, score, log, curve_panels(graph["nodes"]))
        else:  # a search trial: no run folder; pruned on the validation error
            report(epoch, 100 - score)
    if row is None:  # --eval, or resumed a finished run
        row = evaluate(nodes, test_loader, fabric)
    return nodes, row, state


# --- search ------------------------------------------------------------------


def search(nodes, data, fabric, args, out):
    """Run trials until --search of them have finished (completed or pruned) in the study; return the best graph."""
    import optuna

    study, storage = open_study(args, out)
    # attention losses only if every node has an attention branch
    losses = [loss for loss in LOSSES if loss.startswith("prob") or all(name in ABN_ALIASES for name in nodes)]

    def objective(trial):
        graph = sample_graph(trial, nodes, losses)
        trial.set_user_attr("graph", graph)
        trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
        if untrained_nodes(graph):  # a node that keeps its random weights: not worth training
            raise optuna.TrialPruned()

        def report(epoch, error):
            trial.report(error, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        fabric.print(f"trial {trial.number}")
        return 100 - train_graph(graph, data, fabric, args, report=report)[1]["val_top1_ensemble"]

    trials = run_trials(study, storage, objective, args.search, storage_url(args, out))
    best, summary = best_trial(trials, args)
    write_csv(out / "trials.csv", trial_rows(trials))
    write_json(out / "best_graph.json", best.user_attrs["graph"])
    search_picture(out / "search.png", study)
    return best.user_attrs["graph"], summary


# --- main --------------------------------------------------------------------


def main(args):
    import_model_modules(args.model_module)
    graph = check_args(args)
    fabric, out = start_run(args, "ktg_ensemble", marker="args.json")
    if args.search and fabric.world_size > 1:
        raise UserError("--search runs one worker per process: start several, sharing --storage")
    data = load_run_data(fabric, args)  # held out by --split-seed: the same images in every worker of a search
    for name in sorted(set(graph["nodes"])):
        model = create_model(name, len(data["classes"]), args.img_size)  # an unknown name stops the run here
        if name in ABN_ALIASES:
            with torch.no_grad():
                side = min(node_outputs(model.eval(), torch.zeros(1, 3, args.img_size, args.img_size))[2].shape[-2:])
            if max(args.crop_sizes) > side:
                fabric.print(f"note: {name}'s attention maps are {side}×{side} at {args.img_size} px: a --crop-sizes "
                             f"window above {side} is the whole map")
    if fabric.is_global_zero and not args.eval:
        write_json(out / "args.json", vars(args))

    search_summary = None
    if args.eval:  # the graph the checkpoint trained, not a search
        graph = torch.load(args.eval, map_location="cpu", weights_only=True)["graph"]
    elif args.search:
        graph, search_summary = search(graph["nodes"], data, fabric, args, out)
        fabric.print(f"best graph: trial {search_summary['best_trial']}, validation error "
                     f"{search_summary['best_val_error']:.2f} %; retraining it, best.ckpt chosen on the same "
                     f"held-out images")
    nodes, tested, state = train_graph(graph, data, fabric, args, out=out)
    # each node's top-1 on images it trained on, without augmentation: beside the test top-1, over- or underfit
    probe = make_loader(probe_split(data, args.split_seed), "test", max(1, args.batch_size // fabric.world_size),
                        fabric)
    fit, M = evaluate(nodes, probe, fabric), len(nodes)
    top1, train_top1 = [[scores[f"top1_{m}"] for m in range(M)] for scores in (tested, fit)]

    # --- results ------------------------------------------------------------
    results = {
        **run_fields(fabric, args, "ktg_ensemble"), "graph": graph,
        "nodes": [{"name": name, "params": count_parameters(node), "top1": top1[m], "train_top1": train_top1[m]}
                  for m, (name, node) in enumerate(zip(graph["nodes"], nodes))],
        "node_mean_top1": sum(top1) / M, "ensemble_top1": tested["top1_ensemble"], "agreement": tested["agreement"],
        "train_top1_mean": sum(train_top1) / M, "pretrained": state["pretrained"],
        "train_img_per_s": state["history"][-1]["img_per_s"] if state["history"] else None, "wall_s": state["wall_s"],
    }
    if search_summary:
        results["search"] = search_summary
    if args.eval:
        results.update(evaluated=str(args.eval), epochs_trained=state["epoch"], train_img_per_s=None, wall_s=None)
    if fabric.is_global_zero:
        if not args.eval:
            for m, node in enumerate(nodes):  # loadable with plain load_state_dict
                save_weights(out / f"node{m}.safetensors", node, graph["nodes"][m], data)
        write_json(out / (EVAL_RESULTS if args.eval else "results.json"), results)
        if not args.eval:  # --eval adds only its EVAL_RESULTS to --out, which may be the run's folder
            draw_graph(out / "graph.png", graph, {**dict(enumerate(top1)), "ensemble": tested["top1_ensemble"]})
            attention_picture(out / "attention.png", nodes, graph, data, fabric)
        print_summary(results, out)
    finish(fabric)


@torch.no_grad()
def attention_picture(path, nodes, graph, data, fabric, count=5):
    """Each ABN node's attention map and prediction on the first test image of
    `count` classes (seed 002, Fig. 3); its data in attention.csv beside it."""
    images, labels = data["test"]
    shown = [m for m, name in enumerate(graph["nodes"]) if name in ABN_ALIASES]
    if not shown or data.get("streamed"):
        return  # no attention branch, or images streamed from files
    picks = torch.stack([torch.nonzero(labels == c).flatten()[0] for c in range(len(data["classes"]))
                         if (labels == c).any()][:count])
    images, labels = images[picks], labels[picks]
    # resized and normalised as in evaluation, on this process alone
    batch, _ = next(DeviceLoader((images, labels), data, len(picks), fabric.device, train=False).epoch())
    maps, predictions = [], []
    for m in shown:
        # The module inside Fabric's (and DDP's) wrapper: DDP's forward is a collective
        # that the other ranks, which draw nothing, would never join.
        node = nodes[m].module.eval()
        with fabric.autocast():
            logits, _, attention = node_outputs(node, batch)
        maps.append(attention.float())
        predictions.append([data["classes"][c] for c in logits.argmax(1).tolist()])
    names = [f"{m}: {graph['nodes'][m]}" for m in shown]
    truth = [data["classes"][c] for c in labels.tolist()]
    write_csv(path.with_suffix(".csv"), [{"image": int(i), "label": label, **{name: predicted[r] for name, predicted
                                                                             in zip(names, predictions)}}
                                         for r, (i, label) in enumerate(zip(picks.tolist(), truth))])
    return draw_attention(path, images, maps, names, truth, predictions)


def print_summary(results, out):
    print(f"\nktg_ensemble on {results['dataset']}, {results['epochs']} epochs -> {out}")
    for m, node in enumerate(results["nodes"]):
        print(f"{f'{m}: ' + node['name']:<20}{node['top1']:>8.2f}")
    print(f"{'node mean':<20}{results['node_mean_top1']:>8.2f}\n{'ensemble':<20}{results['ensemble_top1']:>8.2f}")
    if "search" in results:
        search = results["search"]
        print(f"search: {search['trials']} trials, {search['completed']} completed, {search['pruned']} pruned, "
              f"best validation error {search['best_val_error']:.2f} % (trial {search['best_trial']})")
    if results["train_img_per_s"] is not None:
        print(f"train {results['train_img_per_s']:.0f} img/s, wall {results['wall_s']:.0f} s")


if __name__ == "__main__":
    exit_on_user_error(main, parse_args())
