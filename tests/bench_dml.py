"""Speed of dml.py against a plain PyTorch DML loop written the way public DML code is.

The baseline: fp32, a DataLoader whose workers apply per-image PIL transforms
(random crop with padding, flip, ToTensor, Normalize), two students, the same
losses, on the device dml.py trains on (a GPU where there is one). dml.py: data
on the device as uint8, batch augmentation, bf16-mixed where the hardware has
it. Both count each training image once per step.

    python tests/bench_dml.py                       # vit_tiny × 2, 32×32, batch 128, cifar10-mini
    python tests/bench_dml.py --students vit_micro vit_micro --images 2560

Writes bench_dml.json (or --out) and prints both figures and their ratio.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.data import CIFAR_MEAN, CIFAR_STD, load_dataset  # noqa: E402
from common.models import create_model  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def dml_device():
    """The device dml.py trains on: Fabric's choice for one device, as `make_fabric` makes it."""
    from lightning_fabric import Fabric

    return Fabric(devices=1).device


def wait_for(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def baseline_img_per_s(students, images, batch_size, workers, device):
    data = load_dataset("cifar10-mini", train_subset=images)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    loader = torch.utils.data.DataLoader(PILDataset(*data["train"], transform), batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True, pin_memory=device.type == "cuda")
    models = [create_model(name, 10, 32, drop_path=0.1).to(device).train() for name in students]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05) for m in models]
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 1:  # the first step pays for start-up
            wait_for(device)
            seen, start = 0, time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = [m(x) for m in models]
        for k, (model, optimizer) in enumerate(zip(models, optimizers)):
            kl = sum(F.kl_div(F.log_softmax(logits[k], 1), F.softmax(logits[j].detach(), 1), reduction="batchmean")
                     for j in range(len(models)) if j != k) / (len(models) - 1)
            loss = F.cross_entropy(logits[k], y, label_smoothing=0.1) + kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seen += len(y)
    wait_for(device)
    return seen / (time.perf_counter() - start)


def project_img_per_s(students, images, batch_size):
    """dml.py's second epoch: like the baseline's steps after its first, it leaves out
    the start-up (the first steps choose kernels and allocate memory)."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "dml.py", "--students", *students, "--epochs", "2", "--train-subset",
                        str(images), "--batch-size", str(batch_size), "--out", out + "/run"],
                       cwd=ROOT, check=True, capture_output=True)
        return json.loads((Path(out) / "run" / "results.json").read_text())["train_img_per_s"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--students", nargs="+", default=["vit_tiny", "vit_tiny"])
    parser.add_argument("--images", type=int, default=1280, help="training images per measurement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--out", default="bench_dml.json")
    args = parser.parse_args()
    ours = project_img_per_s(args.students, args.images, args.batch_size)
    device = dml_device()
    baseline = baseline_img_per_s(args.students, args.images, args.batch_size, args.workers, device)
    result = {"students": args.students, "device": str(device), "img_size": 32, "batch_size": args.batch_size,
              "images": args.images,
              "dml_py_img_per_s": ours, "baseline_img_per_s": baseline, "speedup": ours / baseline,
              "torch_threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
