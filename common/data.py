"""Data sets as uint8 tensors on the training device, augmented there in batches.

- `cifar10-mini` (default): 500 training and 100 test images per class of real
  CIFAR-10, embedded in the project as JPEG bytes (`cifar10_mini.npz`, 6.6 MB).
- `cifar10`, `cifar100`: torchvision's format in `--data-dir`, downloaded when online.
- `imagefolder`: `DIR/train/<class>/*` and `DIR/val/<class>/*` (or, where there is
  no `val/`, `DIR/test/<class>/*`, as CIFAR-10 in JPEG folders), any size, colour
  or grayscale. Decoded once into memory when it fits (`IN_MEMORY_BYTES`),
  otherwise streamed through DataLoader workers with timm's transforms; the file
  list is one numpy array of encoded paths, which forked workers read without
  copying (a Python list's objects are copied page by page as their reference
  counts change, in every worker of every rank).

Training augmentation: for CIFAR-sized images (side <= 64) random crop with
padding + horizontal flip; for larger ones random resized crop + flip. Under
DDP each rank takes its own shard of the same seeded permutation; test images
are dealt out to the ranks so that each counts exactly once.

Every batch has the same shape, so a compiled model never recompiles: training
drops the last partial batch, evaluation pads it with images labelled
`PADDING` (-100, the label `F.cross_entropy` ignores), which no prediction can
match and which the evaluation loops leave out of their counts. On a GPU the
images come in the channels-last layout that cuDNN's convolutions run fastest in.

Used by the four scripts (add_data_flags declares the data flags they share, load_run_data
loads a run's data), bench.py, reproduce.py and common/landscape.py.
"""
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.launch import UserError

DATASETS = ("cifar10-mini", "cifar10", "cifar100", "imagefolder")
MINI_PATH = Path(__file__).with_name("cifar10_mini.npz")
IN_MEMORY_BYTES = 4 * 2**30  # decoded training images above this are streamed instead
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_SIDE = 64  # images up to this side get crop-with-padding, larger ones random resized crop
PADDING = -100  # the label of the images that fill up the last test batch


def add_data_flags(parser, held_out_use="chooses best.ckpt (0: the test split does)", val_split_default=0.0):
    """The data flags of every script, declared once: which images, at what size,
    how many, and which are held out (`held_out_use`: what they are for)."""
    parser.add_argument("--dataset", choices=DATASETS, default="cifar10-mini", help="the data set")
    parser.add_argument("--data-dir", help="where cifar10/cifar100/imagefolder data is")
    parser.add_argument("--img-size", type=int, help="training resolution (default: 32 for CIFAR, 224 for ImageFolder)")
    parser.add_argument("--train-subset", type=int, help="train on a class-balanced subset of this many images")
    parser.add_argument("--val-split", type=float, default=val_split_default,
                        help=f"hold out this part of each training class; it {held_out_use}")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the --train-subset and --val-split images: the same images for every --seed")


def native_img_size(dataset):
    """The default training resolution: the data set's own for CIFAR, 224 for ImageFolder."""
    return 224 if dataset == "imagefolder" else 32


def load_dataset(name, data_dir=None, img_size=None, train_subset=None, seed=0):
    """Return a dict with `train` and `test` (uint8 images N×3×H×W and int64 labels,
    or, with `streamed`, numpy arrays of encoded file paths), `classes`, `mean`, `std`, `img_size`."""
    img_size = img_size or native_img_size(name)
    if name == "cifar10-mini":
        data = _load_mini()
    elif name in ("cifar10", "cifar100"):
        data = _load_torchvision_cifar(name, data_dir)
    elif name == "imagefolder":
        data = _load_image_folder(data_dir, img_size, train_subset, seed)
        train_subset = None  # taken before decoding
    else:
        raise UserError(f"unknown --dataset {name!r}; choose from {', '.join(DATASETS)}")
    if len(data["classes"]) < 2:
        raise UserError(f"--data-dir {data_dir} has {len(data['classes'])} class, and a classifier needs two or more")
    data["img_size"] = img_size
    return subset(data, train_subset, seed) if train_subset is not None else data


def load_run_data(fabric, args):
    """The data of a run from its flags (--dataset, --data-dir, --img-size,
    --train-subset, --val-split, --split-seed): downloaded once per machine, the
    held-out split the same on every process; sets `args.img_size` to the size used."""
    with fabric.rank_zero_first(local=True):  # a download happens once per machine
        data = load_dataset(args.dataset, args.data_dir, args.img_size, args.train_subset, args.split_seed)
    args.img_size = data["img_size"]
    return hold_out(data, args.val_split, args.split_seed) if args.val_split else data


def subset(data, size, seed):
    """The data set with `size` training images, spread over the classes as evenly as possible, chosen by `seed`."""
    images, labels = data["train"]
    num_classes = len(data["classes"])
    if not num_classes <= size <= len(labels):
        raise UserError(f"--train-subset must be between the number of classes ({num_classes}) and the "
                        f"{len(labels)} training images, got {size}")
    generator = torch.Generator().manual_seed(seed)
    labels_t = torch.as_tensor(labels)
    per_class = [torch.nonzero(labels_t == c).flatten() for c in range(num_classes)]
    per_class = [idx[torch.randperm(len(idx), generator=generator)] for idx in per_class]
    # Round-robin over the classes until `size` images are taken.
    order = torch.cat([torch.stack(col) for col in _round_robin(per_class)])[:size]
    order = order.sort().values
    return {**data, "train": (images[order], labels_t[order])}


def probe_split(data, seed=0, size=1000):
    """A fixed, class-balanced part of the training images (at most `size`) as the
    `test` split, read without augmentation: a network's top-1 on it (`train_top1`)
    beside its test top-1 says whether a run overfit or underfit."""
    fixed = subset(data, min(size, len(data["train"][1])), seed)
    return {**fixed, "test": fixed["train"]}


def hold_out(data, fraction, seed):
    """Hold out `fraction` of every class of the training set as `val`, chosen by
    `seed`; the rest stays `train`. Whatever is chosen on `val` (best.ckpt, an
    assistant, a graph) never sees the test split."""
    images, labels = data["train"]
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    held_out = []
    for c in range(len(data["classes"])):
        idx = torch.nonzero(labels == c).flatten()
        held_out.append(idx[torch.randperm(len(idx), generator=generator)][:round(fraction * len(idx))])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.cat(held_out)] = True
    if is_val.all() or not is_val.any():
        raise UserError(f"--val-split {fraction} leaves no training or no validation images")
    return {**data, "train": (images[~is_val], labels[~is_val]), "val": (images[is_val], labels[is_val])}


def _round_robin(lists):
    for i in range(max(len(x) for x in lists)):
        yield [x[i] for x in lists if i < len(x)]


# --- the embedded data set -------------------------------------------------


def build_cifar10_mini(zip_path, out_path=MINI_PATH, train_per_class=500, test_per_class=100):
    """Write the embedded set from shared/data/cifar10.zip: the first files by name of each class."""
    arrays = {}
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
        classes = sorted({n.split("/")[1] for n in names})
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            blobs, labels = [], []
            for c, cls in enumerate(classes):
                files = [n for n in names if n.startswith(f"{split}/{cls}/")][:per_class]
                blobs += [archive.read(n) for n in files]
                labels += [c] * len(files)
            arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
            arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
            arrays[f"{split}_labels"] = np.array(labels, dtype=np.int64)
    np.savez(out_path, classes=np.array(classes), **arrays)


def _load_mini():
    import warnings

    from torchvision.io import decode_jpeg

    stored = np.load(MINI_PATH)
    data = {"classes": [str(c) for c in stored["classes"]], "mean": CIFAR_MEAN, "std": CIFAR_STD}
    for split in ("train", "test"):
        blob, offsets = torch.from_numpy(stored[f"{split}_jpeg"]), stored[f"{split}_offsets"]
        jpegs = [blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        with warnings.catch_warnings():  # deprecated in torchvision 0.29, and still the fastest decoder here
            warnings.simplefilter("ignore", DeprecationWarning)
            images = torch.stack(decode_jpeg(jpegs))
        data[split] = (images, torch.from_numpy(stored[f"{split}_labels"]))
    return data


# --- torchvision CIFAR -----------------------------------------------------


def _load_torchvision_cifar(name, data_dir):
    import torchvision

    if data_dir is None:
        raise UserError(f"--dataset {name} needs --data-dir (where the data set is, or is to be downloaded)")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(data_dir, train=train, download=False)
        except RuntimeError:
            try:
                ds = cls(data_dir, train=train, download=True)
            except Exception as error:
                raise UserError(
                    f"{name} is not in {data_dir} and could not be downloaded ({type(error).__name__}); "
                    f"put {cls.filename} from {cls.url.rsplit('/', 1)[0]} into {data_dir} and unpack it there"
                ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits[split] = (images, torch.tensor(ds.targets))
    return {**splits, "classes": list(ds.classes), "mean": CIFAR_MEAN, "std": CIFAR_STD}


# --- ImageFolder -----------------------------------------------------------


def _scan_folder(root, classes=None):
    """Image paths (a numpy array of encoded paths) and labels of `root/<class>/*`, and
    the class names, with a clear error for each way it can be wrong."""
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not found:
        raise UserError(f"data folder {root} has no class folders")
    if classes is not None and found != classes:
        raise UserError(f"the class folders of {root} differ from those of the training split")
    paths, labels = [], []
    for label, cls in enumerate(found):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"class folder {root / cls} has no images")
        paths += [os.fsencode(file) for file in files]
        labels += [label] * len(files)
    return np.array(paths), torch.tensor(labels), found


def read_rgb(path):
    """Decode one image file (a path, or one encoded as bytes) to RGB, naming the file if it is corrupt."""
    path = os.fsdecode(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:
        reason = str(error).replace(repr(path), "").replace(path, "").strip(" :'") or "unreadable"
        raise UserError(f"cannot read image {path}: {reason} ({type(error).__name__})") from None


def _resize_center_crop(image, short_side, crop):
    """PIL image -> uint8 tensor 3×crop×crop: shorter side to `short_side`, centre crop."""
    w, h = image.size
    scale = short_side / min(w, h)
    image = image.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - crop) // 2, (h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class _DecodeFiles(torch.utils.data.Dataset):
    def __init__(self, paths, short_side, crop):
        self.paths, self.short_side, self.crop = paths, short_side, crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return _resize_center_crop(read_rgb(self.paths[i]), self.short_side, self.crop)


def _decode_all(paths, short_side, crop):
    loader = torch.utils.data.DataLoader(_DecodeFiles(paths, short_side, crop), batch_size=256, num_workers=2)
    return torch.cat(list(loader))


def _load_image_folder(data_dir, img_size, train_subset=None, seed=0):
    if data_dir is None:
        raise UserError("--dataset imagefolder needs --data-dir DIR with DIR/train/<class>/ and DIR/val/<class>/ "
                        "(or DIR/test/<class>/)")
    root = Path(data_dir)
    train_paths, train_labels, classes = _scan_folder(root / "train")
    evaluated = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if evaluated is None:
        raise UserError(f"--data-dir {root} has neither val/ nor test/: the split to evaluate on")
    test_paths, test_labels, _ = _scan_folder(evaluated, classes)
    if train_subset is not None:  # decode only the chosen images
        chosen = subset({"classes": classes, "train": (train_paths, train_labels)}, train_subset, seed)
        train_paths, train_labels = chosen["train"]
    data = {"classes": classes, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    # Large images are stored a little larger than the training size (the usual
    # 0.875 crop ratio), so that random resized crops have pixels to take.
    store = img_size if img_size <= SMALL_SIDE else math.ceil(img_size / 0.875)
    if len(train_paths) * 3 * store * store > IN_MEMORY_BYTES:
        data["train"], data["test"] = (train_paths, train_labels), (test_paths, test_labels)
        data["streamed"] = True
        return data
    data["train"] = (_decode_all(train_paths, store, store), train_labels)
    data["test"] = (_decode_all(test_paths, store, img_size), test_labels)
    return data


# --- batches on the device -------------------------------------------------


def augment(images, out_size, generator):
    """uint8 N×3×S×S on the device -> float N×3×out×out in [0, 255], randomly cropped and flipped."""
    n, _, side, _ = images.shape
    device = images.device
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    if side <= SMALL_SIDE:  # random crop with side/8 zero padding, then flip
        pad = side // 8
        padded = F.pad(images, (pad, pad, pad, pad))
        dy, dx = (torch.randint(0, 2 * pad + 1, (2, n), device=device, generator=generator))
        steps = torch.arange(side, device=device)
        rows = (dy[:, None] + steps)[:, None, :, None]
        cols = (dx[:, None] + steps)[:, None, None, :]
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
        channels = torch.arange(3, device=device)[None, :, None, None]
        out = padded[torch.arange(n, device=device)[:, None, None, None], channels, rows, cols].float()
        return resize(out, out_size)
    # Random resized crop (scale 0.08-1, ratio 3/4-4/3) and flip as one affine resampling.
    area = torch.empty(n, device=device).uniform_(0.08, 1.0, generator=generator)
    log_ratio = torch.empty(n, device=device).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    centre = (torch.rand(2, n, device=device, generator=generator) * 2 - 1) * torch.stack([1 - width, 1 - height])
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = torch.where(flip, -width, width)
    theta[:, 1, 1] = height
    theta[:, :, 2] = centre.T
    grid = F.affine_grid(theta, (n, 3, out_size, out_size), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def resize(images, size):
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class DeviceLoader:
    """Batches of a uint8 data set kept on the device, this rank's shard of a seeded permutation.

    Training batches are augmented; test batches are only resized. Yields
    normalised float images and int64 labels.
    """

    def __init__(self, split, data, batch_size, device, train, seed=0, rank=0, world_size=1, augment=True):
        images, labels = split
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.train, self.seed, self.augment = batch_size, train, seed, train and augment
        self.rank, self.world_size, self.img_size = rank, world_size, data["img_size"]
        self.mean = torch.tensor(data["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(data["std"], device=device).view(1, 3, 1, 1) * 255
        per_rank = len(self.labels) // world_size if train else math.ceil(len(self.labels) / world_size)
        self.num_batches = max(1, per_rank // batch_size) if train else math.ceil(per_rank / batch_size)

    def __len__(self):
        return self.num_batches

    def indices(self, epoch):
        """This rank's sample indices for `epoch`: the same for the same seed, whatever the mode."""
        n = len(self.labels)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        per_rank = n // self.world_size
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def epoch(self, epoch=0):
        indices = self.indices(epoch).to(self.images.device)
        generator = torch.Generator(self.images.device).manual_seed(self.seed * 100_003 + epoch * 101 + self.rank)
        for b in range(self.num_batches):
            batch = indices[b * self.batch_size:(b + 1) * self.batch_size]
            images, labels = pad_batch(self.images[batch], self.labels[batch], self.batch_size)
            if self.augment:
                images = augment(images, self.img_size, generator)
            else:
                images = resize(images.float(), self.img_size)
            yield on_device_layout((images - self.mean) / self.std), labels


def pad_batch(images, labels, size):
    """A short batch filled up to `size` with black images labelled PADDING."""
    missing = size - len(labels)
    if missing <= 0:
        return images, labels
    return (torch.cat([images, images.new_zeros((missing, *images.shape[1:]))]),
            torch.cat([labels, labels.new_full((missing,), PADDING)]))


def on_device_layout(images):
    return images.contiguous(memory_format=torch.channels_last) if images.device.type == "cuda" else images


class _TransformImages(torch.utils.data.Dataset):
    """Images (uint8 tensors, or encoded paths of files to decode) through a per-image PIL transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        image = read_rgb(image) if isinstance(image, bytes) else Image.fromarray(image.permute(1, 2, 0).numpy())
        return self.transform(image), self.labels[i]


def default_transform(data, train):
    """timm's transforms: random resized crop + flip for training, resize + centre crop for testing."""
    from timm.data import create_transform

    return create_transform(data["img_size"], is_training=train, mean=data["mean"], std=data["std"],
                            color_jitter=0.0 if train else None)


def uint8_transform(transform):
    """`transform` with its final ToTensor and Normalize replaced by a uint8 tensor, and
    that Normalize's (mean, std), for the device to apply. A transform that ends
    otherwise is kept as it is, with None."""
    import torchvision.transforms as T

    steps = getattr(transform, "transforms", [])
    if len(steps) < 2 or not (isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize)):
        return transform, None
    return T.Compose([*steps[:-2], T.PILToTensor()]), (steps[-1].mean, steps[-1].std)


def default_workers(fabric):
    """DataLoader workers per rank: the cores this process may run on (its CPU
    affinity, which schedulers such as Slurm set), shared by the ranks on this
    machine, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # torchrun (`fabric run`) sets LOCAL_WORLD_SIZE; without it every rank is counted as on this machine
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or fabric.world_size)
    return max(1, min(8, cores // ranks_here))


class TransformLoader:
    """Per-image transforms in DataLoader workers: for data sets too large for memory,
    and for augmentations that exist only per image (RandAugment).

    The workers send uint8 batches (a quarter of float32's bytes to pass between
    processes, pin and copy); the device converts and normalises them. On a GPU the
    next batch is copied while the current one trains, as in timm's PrefetchLoader.
    `repeats` > 1 uses timm's repeated-augmentation sampler (Hoffer et al. 2020).
    """

    def __init__(self, split, data, batch_size, device, train, seed, rank, world_size, transform, repeats=1,
                 workers=1):
        from timm.data.distributed_sampler import RepeatAugSampler

        images, labels = split
        transform, normalization = uint8_transform(transform)
        dataset = _TransformImages(images, labels, transform)
        if train and repeats > 1:
            self.sampler = RepeatAugSampler(dataset, world_size, rank, num_repeats=repeats)
        elif train:
            self.sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed,
                                                               drop_last=True)
        else:  # every test image once: DistributedSampler would repeat some to even out the ranks
            self.sampler = _EveryNth(len(dataset), rank, world_size)
        # Workers start anew each epoch and draw their seeds from torch's generator,
        # which `seed_epoch` seeds: RandAugment draws the same after a resume.
        self.loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=self.sampler, num_workers=workers,
                                                  pin_memory=device.type == "cuda", drop_last=train)
        self.device, self.seed, self.batch_size, self.train = device, seed, batch_size, train
        self.mean = self.std = None
        if normalization is not None:
            self.mean, self.std = (torch.as_tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
                                   for v in normalization)

    def __len__(self):
        return len(self.loader)

    def epoch(self, epoch=0):
        self.sampler.set_epoch(self.seed * 100_003 + epoch)
        if self.device.type != "cuda":  # no copy to overlap with
            for images, labels in self.loader:
                yield self.to_device(images, labels)
            return
        # As timm's PrefetchLoader: batch i + 1 is copied and normalised on a side
        # stream while the default stream trains on batch i.
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        ahead = None
        for images, labels in self.loader:
            with torch.cuda.stream(side):
                batch = self.to_device(images, labels)
            if ahead is not None:
                yield ahead
            main.wait_stream(side)
            for tensor in batch:  # made on the side stream: its memory is not reused while the main one reads it
                tensor.record_stream(main)
            ahead = batch
        if ahead is not None:
            yield ahead

    def to_device(self, images, labels):
        """A batch from the workers on the device: padded (test), normalised, in the device's layout."""
        if not self.train:
            images, labels = pad_batch(images, labels, self.batch_size)
        images = images.to(self.device, non_blocking=True)
        if self.mean is not None:  # as torchvision's ToTensor and Normalize compute it: the same numbers
            images = images.float().div_(255).sub_(self.mean).div_(self.std)
        return on_device_layout(images), labels.to(self.device, non_blocking=True)


class _EveryNth(torch.utils.data.Sampler):
    """Indices rank, rank + world_size, ...: this rank's share of the test images, none twice."""

    def __init__(self, size, rank, world_size):
        self.indices = range(rank, size, world_size)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)

    def set_epoch(self, epoch):
        pass


def make_loader(data, split, batch_size, fabric, seed=0, transform=None, repeats=1, augment=True, workers=None):
    """The training (shuffled, augmented unless `augment` is False) or test loader of
    `split` for this rank: on the device, unless the data is streamed or a per-image
    `transform` is asked for (then through `workers` DataLoader processes, default
    `default_workers`)."""
    train = split == "train"
    if train and batch_size * fabric.world_size > len(data[split][1]):
        # one short batch filled up with black images would be all it trained on
        raise UserError(f"--batch-size {batch_size * fabric.world_size} exceeds the {len(data[split][1])} training "
                        f"images: give a smaller --batch-size or more images")
    if data.get("streamed") or transform is not None:
        transform = transform or default_transform(data, train and augment)
        workers = default_workers(fabric) if workers is None else workers
        return TransformLoader(data[split], data, batch_size, fabric.device, train, seed, fabric.global_rank,
                               fabric.world_size, transform, repeats, workers)
    return DeviceLoader(data[split], data, batch_size, fabric.device, train, seed, fabric.global_rank,
                        fabric.world_size, augment)


if __name__ == "__main__":
    import sys

    # python -m common.data ../shared/data/cifar10.zip   (re)builds the embedded set
    build_cifar10_mini(sys.argv[1])
    print(f"wrote {MINI_PATH} ({MINI_PATH.stat().st_size / 1e6:.1f} MB)")
