"""Speed of one training step of each method, against what the hardware can do.

For each method, with its README default models at 32×32 on cifar10-mini and the
device and precision the scripts would use (`make_fabric`):

    dml   two vit_tiny, batch 128          deit  deit_tiny from a resnet56 teacher, batch 128
    takd  a KD step plain10 → plain4, 128  ktg   three resnet20_abn on the dml graph, batch 64

it measures images/s after warm-up steps; GFLOP per image of the whole step
(forward and backward of the trained networks, forward of a frozen teacher),
counted by torch's FlopCounterMode; the device's peak, from a large GEMM in the
run's precision; MFU = achieved FLOP/s ÷ that peak; where the step's time goes
(data, forward, backward, optimizer, other: fractions that add up to 1); and the
peak memory (CUDA: the allocator's peak; CPU: the growth of the peak resident
memory during the method's steps). Two ratios tell whether a script wastes work: KTG's three-node step
against three one-node steps, and the teacher's share of a DeiT step.

    python bench.py                                  # all four, prints a table
    python bench.py --json bench.json --steps 20 --methods dml deit
    fabric run --accelerator cuda --devices 1 bench.py --json bench_gpu.json
"""
import argparse
import json
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import dml
import ktg_ensemble
from common.data import load_dataset, make_loader
from common.graph import preset
from common.losses import kd_loss, label_loss
from common.models import create_model, freeze
from common.run import inference_dtype, make_fabric
from deit import student_loss

METHODS = ("dml", "deit", "takd", "ktg")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to measure")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (after 3 warm-up steps)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


class Timer:
    """Wall time per part of a step; waits for the device before each reading."""

    def __init__(self, device):
        self.device, self.seconds, self.last = device, {}, None

    def mark(self, part=None):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if part is not None:
            self.seconds[part] = self.seconds.get(part, 0.0) + now - self.last
        self.last = now


def method_step(method, fabric, data):
    """The batch size, the trained models, the loss as a function of (the set-up
    models, images, labels[, teacher logits]) and the frozen teacher, as in the script."""
    classes, device = len(data["classes"]), fabric.device
    dtype = inference_dtype(fabric)
    if method == "dml":
        models = [create_model("vit_tiny", classes, 32, drop_path=0.1, device=device) for _ in range(2)]
        args = argparse.Namespace(mode="dml", smoothing=0.1, dml_target="prediction")
        forward = lambda students, images, labels: dml.student_losses(students, images, labels, args).sum()
        return 128, models, forward, None
    if method == "deit":
        student = create_model("deit_tiny", classes, 32, drop_path=0.1, device=device)
        teacher = freeze(create_model("resnet56", classes, 32, device=device), dtype)
        args = argparse.Namespace(distillation_type="hard", distillation_alpha=0.5, smoothing=0.1)

        def teach(images):
            with torch.no_grad():
                return teacher(images.to(dtype))
        forward = lambda models, images, labels, teacher_logits: student_loss(models[0](images), teacher_logits,
                                                                              labels, args)[0]
        return 128, [student], forward, teach
    if method == "takd":
        student = create_model("plain4", classes, 32, device=device)
        teacher = freeze(create_model("plain10", classes, 32, device=device), dtype)

        def teach(images):
            with torch.no_grad():
                return teacher(images.to(dtype))
        forward = lambda models, images, labels, teacher_logits: kd_loss(models[0](images), teacher_logits, labels,
                                                                         0.9, 4.0)[0]
        return 128, [student], forward, teach
    nodes = [create_model("resnet20_abn", classes, 32, device=device) for _ in range(3)]
    graph = preset("dml", ["resnet20_abn"] * 3)

    def forward(models, images, labels):
        outputs = [ktg_ensemble.node_outputs(node, images) for node in models]
        return ktg_ensemble.graph_loss(graph, outputs, labels, 1, 100, (3, 7, 11))
    return 64, nodes, forward, None


def measure(method, fabric, data, steps):
    """img/s, GFLOP per image, the time breakdown and peak memory of one method's step."""
    batch_size, models, forward, teach = method_step(method, fabric, data)
    models = [fabric.setup_module(model) for model in models]
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for m in models for p in m.parameters()], lr=1e-4))
    loader = make_loader(data, "train", batch_size, fabric, seed=0)
    batches = loader.epoch(0)
    timer = Timer(fabric.device)
    rss_before = reset_peak_rss()
    if fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        timer.mark()
        images, labels = next(batches)
        timer.mark("data")
        teacher_logits = None
        if teach is not None:
            teacher_logits = teach(images)
            timer.mark("teacher")
        loss = forward(models, images, labels, *([teacher_logits] if teach else []))
        timer.mark("forward")
        fabric.backward(loss)
        timer.mark("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.mark("optimizer")

    for _ in range(3):  # warm-up: kernels chosen, memory allocated
        step()
    # the step's FLOPs: forward and backward of the trained networks, forward of the teacher
    with FlopCounterMode(display=False) as counter:
        images, labels = next(batches)
        teacher_logits = teach(images) if teach is not None else None
        loss = forward(models, images, labels, *([teacher_logits] if teach else []))
        fabric.backward(loss)
    optimizer.zero_grad(set_to_none=True)
    timer.seconds.clear()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    total = time.perf_counter() - start
    parts = dict(timer.seconds)
    forward_s = parts.pop("forward") + parts.pop("teacher", 0.0)
    breakdown = {"data": parts["data"], "forward": forward_s, "backward": parts["backward"],
                 "optimizer": parts["optimizer"]}
    breakdown["other"] = max(0.0, total - sum(breakdown.values()))
    result = {
        "batch_size": batch_size, "img_per_s": steps * batch_size / total,
        "gflop_per_img": counter.get_total_flops() / batch_size / 1e9,
        "breakdown": {part: seconds / total for part, seconds in breakdown.items()},
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if fabric.device.type == "cuda" else
                           (peak_rss() - rss_before) / 2**20),
    }
    if teach is not None:
        result["teacher_share"] = timer.seconds.get("teacher", 0.0) / total
    return result


def reset_peak_rss():
    """Linux: start the process's peak resident memory afresh; returns the resident memory now (bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:  # elsewhere: the peak since start, as getrusage knows it
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss():
    try:
        return _status_kb("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kb(field):
    with open("/proc/self/status") as file:
        return int(next(line for line in file if line.startswith(field)).split()[1])


def one_node_img_per_s(fabric, data, steps):
    """A single resnet20_abn trained on its label: the unit KTG's three-node step is compared with."""
    node = fabric.setup_module(create_model("resnet20_abn", len(data["classes"]), 32, device=fabric.device))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(node.parameters(), lr=0.01, momentum=0.9))
    batches = make_loader(data, "train", 64, fabric, seed=0).epoch(0)
    for i in range(3 + steps):
        if i == 3:
            start = time.perf_counter()
        images, labels = next(batches)
        logits, attention_logits, _ = ktg_ensemble.node_outputs(node, images)
        fabric.backward(label_loss(logits, attention_logits, labels).mean())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if fabric.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * 64 / (time.perf_counter() - start)


def peak_gflops(fabric, size=None, repeats=10):
    """The device's matrix-multiply rate in the run's precision: a large square GEMM
    of operands already in that dtype (bf16 or fp16 for mixed precision)."""
    size = size or (8192 if fabric.device.type == "cuda" else 4096)
    precision = str(fabric.strategy.precision.precision)
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
    a = torch.randn(size, size, device=fabric.device, dtype=dtype)
    b = torch.randn(size, size, device=fabric.device, dtype=dtype)
    for i in range(repeats + 2):
        if i == 2:
            if fabric.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        a @ b
    if fabric.device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def main(args):
    fabric = make_fabric()
    torch.manual_seed(0)
    data = load_dataset("cifar10-mini")
    peak = peak_gflops(fabric)
    report = {"device": str(fabric.device) if fabric.device.type != "cuda" else torch.cuda.get_device_name(),
              "precision": str(fabric.strategy.precision.precision), "threads": torch.get_num_threads(),
              "peak_gflops": peak, "methods": {}}
    for method in args.methods:
        result = measure(method, fabric, data, args.steps)
        result["mfu"] = result["img_per_s"] * result["gflop_per_img"] / peak
        report["methods"][method] = result
    if "ktg" in args.methods:
        # 1.0: three nodes cost three single nodes; above: the graph's losses add work
        report["ktg_vs_three_nodes"] = one_node_img_per_s(fabric, data, args.steps) / 3 \
            / report["methods"]["ktg"]["img_per_s"]
    print_table(report)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


def print_table(report):
    print(f"{report['device']}, {report['precision']}, peak {report['peak_gflops']:.0f} GFLOP/s")
    print(f"{'method':<7}{'img/s':>8}{'GFLOP/img':>11}{'MFU':>7}{'data':>7}{'fwd':>7}{'bwd':>7}{'opt':>7}"
          f"{'other':>7}{'MB':>8}")
    for method, r in report["methods"].items():
        b = r["breakdown"]
        print(f"{method:<7}{r['img_per_s']:>8.1f}{r['gflop_per_img']:>11.2f}{r['mfu']:>7.3f}{b['data']:>7.2f}"
              f"{b['forward']:>7.2f}{b['backward']:>7.2f}{b['optimizer']:>7.2f}{b['other']:>7.2f}"
              f"{r['peak_memory_mb']:>8.0f}")
    if "deit" in report["methods"]:
        print(f"deit: the teacher takes {report['methods']['deit']['teacher_share']:.0%} of a step")
    if "ktg_vs_three_nodes" in report:
        print(f"ktg: a three-node step costs {report['ktg_vs_three_nodes']:.2f}× three one-node steps")


if __name__ == "__main__":
    main(parse_args())
