"""Speed of one training step of each method, against what the hardware can do.

For each method, with its README default models on cifar10-mini (32×32, or
`--img-size`) and the device and precision the scripts would use (`make_fabric`):

    dml   two vit_tiny, batch 128          deit  deit_tiny from a resnet56 teacher, batch 128
    takd  a KD step plain10 → plain4, 128  ktg   three resnet20_abn on the dml graph, batch 64

it measures images/s per device after warm-up steps, on the device's own clock
(CUDA events; on the CPU perf_counter) over steps that never wait for it; GFLOP
per image of the whole step (forward and backward of the trained networks,
forward of a frozen teacher), counted by torch's FlopCounterMode; the device's
peak, from a large GEMM in the run's precision; MFU = achieved FLOP/s ÷ that
peak; where the step's time goes (data, forward, backward, optimizer, other:
fractions that add up to 1), from a second pass that waits for the device after
each part (its rate, `synced_img_per_s`, is that of a serialised step); and the
peak memory (CUDA: the allocator's peak; CPU: the growth of the peak resident
memory during the method's steps). Two ratios tell whether a script wastes work: KTG's three-node step
against three one-node steps, and the teacher's share of a DeiT step.

For data streamed from an ImageFolder it measures how many images one DataLoader
worker decodes and transforms per second on this CPU (timm's training transform,
uint8 out), on `--data-dir`'s training files or on ImageNet-sized JPEGs written
to a temporary folder: a GPU's img/s divided by that is the workers it needs.

    python bench.py                                  # all four, prints a table
    python bench.py --json bench.json --steps 20 --methods dml deit
    python bench.py --methods dml --img-size 224 --batch-size 64 --compile
    fabric run --accelerator cuda --devices 1 bench.py --json bench_gpu.json
"""
import argparse
import itertools
import json
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import dml
import ktg_ensemble
from common.data import (IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, SMALL_SIDE, default_workers, load_dataset,
                         make_loader, native_img_size)
from common.graph import preset
from common.launch import UserError, exit_on_user_error, inference_dtype, make_fabric, require_positive
from common.losses import kd_loss, label_loss
from common.models import create_model, freeze
from deit import student_loss

METHODS = ("dml", "deit", "takd", "ktg")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to measure")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (after 3 warm-up steps)")
    parser.add_argument("--batch-size", type=int, help="images per device and step (default: each method's "
                        "README batch size, 128; ktg 64)")
    parser.add_argument("--img-size", type=int, default=32, help="image side the models are made for; the data is "
                        "resized to it on the device")
    parser.add_argument("--compile", action="store_true", help="wrap the models in torch.compile, as the scripts' "
                        "--compile does (the warm-up steps compile)")
    parser.add_argument("--data-dir", help="an ImageFolder (DIR/train/<class>/) whose first files the decoding "
                        "rate is measured on (default: ImageNet-sized JPEGs made in a temporary folder)")
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


def timed(device, run):
    """Seconds `run()` takes on the device's own clock: between two CUDA events, with
    nothing waiting for the GPU in between; on the CPU, where every operation has
    finished when it returns, by perf_counter."""
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def endless(loader):
    """The loader's batches epoch after epoch: as many steps as asked, whatever the data's size and the devices."""
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def method_step(method, fabric, data, compile=False):
    """The batch size, the trained models, the loss as a function of (the set-up
    models, images, labels[, teacher logits]) and the frozen teacher, as in the script."""
    classes, device, img_size = len(data["classes"]), fabric.device, data["img_size"]
    dtype = inference_dtype(fabric)
    if method == "dml":
        models = [create_model("vit_tiny", classes, img_size, drop_path=0.1, device=device) for _ in range(2)]
        args = argparse.Namespace(mode="dml", smoothing=0.1, dml_target="prediction")
        forward = lambda students, images, labels: sum(dml.student_losses(students, images, labels, args).values())
        return 128, models, forward, None
    if method == "deit":
        student = create_model("deit_tiny", classes, img_size, drop_path=0.1, device=device)
        teacher = freeze(create_model("resnet56", classes, img_size, device=device), dtype, compile)
        args = argparse.Namespace(distillation_type="hard", distillation_alpha=0.5, smoothing=0.1)

        def teach(images):
            with torch.no_grad():
                return teacher(images.to(dtype))
        forward = lambda models, images, labels, teacher_logits: sum(student_loss(models[0](images), teacher_logits,
                                                                                  labels, args).values())
        return 128, [student], forward, teach
    if method == "takd":
        student = create_model("plain4", classes, img_size, device=device)
        teacher = freeze(create_model("plain10", classes, img_size, device=device), dtype, compile)

        def teach(images):
            with torch.no_grad():
                return teacher(images.to(dtype))
        forward = lambda models, images, labels, teacher_logits: sum(kd_loss(models[0](images), teacher_logits,
                                                                             labels, 0.9, 4.0).values())
        return 128, [student], forward, teach
    nodes = [create_model("resnet20_abn", classes, img_size, device=device) for _ in range(3)]
    graph = preset("dml", ["resnet20_abn"] * 3)

    def forward(models, images, labels):
        outputs = [ktg_ensemble.node_outputs(node, images) for node in models]
        return sum(ktg_ensemble.graph_loss(graph, outputs, labels, 1, 100, (3, 7, 11)).values())
    return 64, nodes, forward, None


def measure(method, fabric, data, steps, batch_size=None, compile=False):
    """img/s, GFLOP per image, the time breakdown and peak memory of one method's step."""
    default_batch, models, forward, teach = method_step(method, fabric, data, compile)
    batch_size = batch_size or default_batch
    models = [fabric.setup_module(torch.compile(model) if compile else model) for model in models]
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for m in models for p in m.parameters()], lr=1e-4))
    batches = endless(make_loader(data, "train", batch_size, fabric, seed=0))
    timer = Timer(fabric.device)
    rss_before = reset_peak_rss()
    if fabric.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(mark=lambda part=None: None):
        mark()
        images, labels = next(batches)
        mark("data")
        teacher_logits = None
        if teach is not None:
            teacher_logits = teach(images)
            mark("teacher")
        loss = forward(models, images, labels, *([teacher_logits] if teach else []))
        mark("forward")
        fabric.backward(loss)
        mark("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")

    for _ in range(3):  # warm-up: kernels chosen (and compiled), memory allocated
        step()
    # the step's FLOPs: forward and backward of the trained networks, forward of the teacher
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter, \
            warnings.catch_warnings():  # the counter's module hooks make a compiled module warn, run eagerly here
        warnings.filterwarnings("ignore", "Using `torch.compile")
        images, labels = next(batches)
        teacher_logits = teach(images) if teach is not None else None
        loss = forward(models, images, labels, *([teacher_logits] if teach else []))
        fabric.backward(loss)
    optimizer.zero_grad(set_to_none=True)
    # img/s: steps as the scripts run them, nothing waiting for the device in between
    elapsed = timed(fabric.device, lambda: [step() for _ in range(steps)])
    # where the time goes: the same steps again, each part waited for
    timer.mark()
    start = time.perf_counter()
    for _ in range(steps):
        step(timer.mark)
    synced = time.perf_counter() - start
    parts = dict(timer.seconds)
    forward_s = parts.pop("forward") + parts.pop("teacher", 0.0)
    breakdown = {"data": parts["data"], "forward": forward_s, "backward": parts["backward"],
                 "optimizer": parts["optimizer"]}
    breakdown["other"] = max(0.0, synced - sum(breakdown.values()))
    result = {
        "batch_size": batch_size, "img_per_s": steps * batch_size / elapsed,
        "synced_img_per_s": steps * batch_size / synced,
        "gflop_per_img": counter.get_total_flops() / batch_size / 1e9,
        "breakdown": {part: seconds / synced for part, seconds in breakdown.items()},
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if fabric.device.type == "cuda" else
                           (peak_rss() - rss_before) / 2**20),
    }
    if teach is not None:
        result["teacher_share"] = timer.seconds.get("teacher", 0.0) / synced
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


def one_node_img_per_s(fabric, data, steps, batch_size=None, compile=False):
    """A single resnet20_abn trained on its label: the unit KTG's three-node step is compared with."""
    batch_size = batch_size or 64
    node = create_model("resnet20_abn", len(data["classes"]), data["img_size"], device=fabric.device)
    node = fabric.setup_module(torch.compile(node) if compile else node)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(node.parameters(), lr=0.01, momentum=0.9))
    batches = endless(make_loader(data, "train", batch_size, fabric, seed=0))

    def step():
        images, labels = next(batches)
        logits, attention_logits, _ = ktg_ensemble.node_outputs(node, images)
        fabric.backward(label_loss(logits, attention_logits, labels).mean())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    return steps * batch_size / timed(fabric.device, lambda: [step() for _ in range(steps)])


def peak_gflops(fabric, size=None, repeats=10):
    """The device's matrix-multiply rate in the run's precision: a large square GEMM
    of operands already in that dtype (bf16 or fp16 for mixed precision)."""
    size = size or (8192 if fabric.device.type == "cuda" else 4096)
    precision = str(fabric.strategy.precision.precision)
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
    a = torch.randn(size, size, device=fabric.device, dtype=dtype)
    b = torch.randn(size, size, device=fabric.device, dtype=dtype)
    for _ in range(2):
        a @ b
    return 2 * size ** 3 * repeats / timed(fabric.device, lambda: [a @ b for _ in range(repeats)]) / 1e9


def decode_img_per_s(fabric, img_size, photos, data_dir=None):
    """Images one DataLoader worker of the streamed ImageFolder path decodes and
    transforms per second, and the files' mean size in KB: on the first
    len(`photos`) training files of `data_dir`, or on `photos` written as JPEGs."""
    with tempfile.TemporaryDirectory() as temp:
        train = Path(data_dir) / "train" if data_dir else write_jpegs(Path(temp), photos)
        classes = sorted(folder for folder in train.iterdir() if folder.is_dir())
        files = list(itertools.islice((file for folder in classes for file in sorted(folder.iterdir())
                                       if file.suffix.lower() in IMAGE_SUFFIXES), len(photos)))
        data = {"train": (np.array([os.fsencode(file) for file in files]), torch.zeros(len(files), dtype=torch.int64)),
                "classes": ["a", "b"], "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "img_size": img_size,
                "streamed": True}
        worker = make_loader(data, "train", 1, fabric, workers=0).loader.dataset  # what each worker runs
        worker[0]  # warm-up
        start = time.perf_counter()
        for i in range(len(files)):
            worker[i]
        rate = len(files) / (time.perf_counter() - start)
        return rate, sum(file.stat().st_size for file in files) / len(files) / 1e3


def write_jpegs(root, photos):
    """Files like ImageNet's: photos enlarged to 500×375 (its typical size), with
    noise for the detail a real photo has, as JPEG at quality 90 (about 110 KB,
    ImageNet's mean). Returns the training folder."""
    folder = root / "train" / "photos"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, photo in enumerate(photos):
        picture = Image.fromarray(photo.permute(1, 2, 0).numpy()).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(picture) + rng.normal(0, 24, (375, 500, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root / "train"


def check_args(args):
    require_positive(steps=args.steps, batch_size=args.batch_size, img_size=args.img_size)
    if args.data_dir and not (Path(args.data_dir) / "train").is_dir():
        raise UserError(f"--data-dir {args.data_dir}: no train/ folder of class folders in it")
    if args.json and (Path(args.json).is_dir() or not Path(args.json).parent.is_dir()):
        raise UserError(f"--json {args.json}: {'a folder' if Path(args.json).is_dir() else 'its folder does not exist'}"
                        f"; give a file to write")


def main(args):
    check_args(args)
    fabric = make_fabric()
    torch.manual_seed(0)
    data = load_dataset("cifar10-mini", img_size=args.img_size)
    peak = peak_gflops(fabric)
    # the streamed path is for large images: at CIFAR sizes, decoding is measured at ImageNet's 224
    decode_size = args.img_size if args.img_size > SMALL_SIDE else native_img_size("imagefolder")
    decode, file_kb = decode_img_per_s(fabric, decode_size, data["train"][0][:64], args.data_dir)
    report = {"device": str(fabric.device) if fabric.device.type != "cuda" else torch.cuda.get_device_name(),
              "devices": fabric.world_size, "precision": str(fabric.strategy.precision.precision),
              "threads": torch.get_num_threads(), "img_size": args.img_size, "compile": args.compile,
              "peak_gflops": peak, "decode_img_per_s_per_worker": decode, "decode_img_size": decode_size,
              "decode_file_kb": file_kb, "loader_workers": default_workers(fabric), "methods": {}}
    for method in args.methods:
        result = measure(method, fabric, data, args.steps, args.batch_size, args.compile)
        result["mfu"] = result["img_per_s"] * result["gflop_per_img"] / peak
        report["methods"][method] = result
    if "ktg" in args.methods:
        # 1.0: three nodes cost three single nodes; above: the graph's losses add work
        report["ktg_vs_three_nodes"] = one_node_img_per_s(fabric, data, args.steps, args.batch_size, args.compile) \
            / 3 / report["methods"]["ktg"]["img_per_s"]
    if fabric.is_global_zero:
        print_table(report)
        if args.json:
            with open(args.json, "w") as file:
                json.dump(report, file, indent=2)
    return report


def print_table(report):
    print(f"{report['device']} × {report['devices']}, {report['precision']}, {report['img_size']} px"
          f"{', compiled' if report['compile'] else ''}, peak {report['peak_gflops']:.0f} GFLOP/s per device")
    print(f"{'method':<7}{'img/s':>8}{'synced':>8}{'GFLOP/img':>11}{'MFU':>7}{'data':>7}{'fwd':>7}{'bwd':>7}"
          f"{'opt':>7}{'other':>7}{'MB':>8}")
    for method, r in report["methods"].items():
        b = r["breakdown"]
        print(f"{method:<7}{r['img_per_s']:>8.1f}{r['synced_img_per_s']:>8.1f}{r['gflop_per_img']:>11.2f}"
              f"{r['mfu']:>7.3f}{b['data']:>7.2f}{b['forward']:>7.2f}{b['backward']:>7.2f}{b['optimizer']:>7.2f}"
              f"{b['other']:>7.2f}{r['peak_memory_mb']:>8.0f}")
    print("img/s per device; synced: the same steps waiting for the device after each part (the breakdown's pass)")
    if "deit" in report["methods"]:
        print(f"deit: the teacher takes {report['methods']['deit']['teacher_share']:.0%} of a step")
    if "ktg_vs_three_nodes" in report:
        print(f"ktg: a three-node step costs {report['ktg_vs_three_nodes']:.2f}× three one-node steps")
    decode, workers = report["decode_img_per_s_per_worker"], report["loader_workers"]
    print(f"streamed ImageFolder: one DataLoader worker decodes and transforms {decode:.0f} img/s "
          f"({report['decode_img_size']} px, {report['decode_file_kb']:.0f} KB JPEGs); the default workers per "
          f"device here ({workers}) feed at most {decode * workers:.0f} img/s")


if __name__ == "__main__":
    exit_on_user_error(main, parse_args())
