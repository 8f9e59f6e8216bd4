import contextlib
import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import common.data as data_module
from common.data import (PADDING, DeviceLoader, augment, default_transform, hold_out, load_dataset, make_loader,
                         probe_split, read_rgb, subset)
from common.launch import UserError
from conftest import FakeFabric


def test_embedded_dataset():
    data = load_dataset("cifar10-mini")
    images, labels = data["train"]
    assert images.shape == (5000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [500] * 10
    assert data["test"][0].shape == (1000, 3, 32, 32)
    assert len(data["classes"]) == 10 and data["img_size"] == 32
    assert 100 < images.float().mean() < 150  # real photos, not blank


def test_train_subset_is_class_balanced_and_seeded():
    a = load_dataset("cifar10-mini", train_subset=250, seed=1)
    b = load_dataset("cifar10-mini", train_subset=250, seed=1)
    c = load_dataset("cifar10-mini", train_subset=250, seed=2)
    assert torch.bincount(a["train"][1]).tolist() == [25] * 10
    assert torch.equal(a["train"][0], b["train"][0])
    assert not torch.equal(a["train"][0], c["train"][0])
    with pytest.raises(UserError, match="train-subset"):
        load_dataset("cifar10-mini", train_subset=0)


def test_order_depends_on_seed_and_epoch_only():
    data = load_dataset("cifar10-mini", train_subset=200)
    first = make_loader(data, "train", 32, FakeFabric(), seed=3)
    second = make_loader(data, "train", 32, FakeFabric(), seed=3)
    assert torch.equal(first.indices(0), second.indices(0))
    assert not torch.equal(first.indices(0), first.indices(1))
    batches_a = [labels for _, labels in first.epoch(0)]
    batches_b = [labels for _, labels in second.epoch(0)]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    images, labels = next(first.epoch(0))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert -3 < images.mean() < 3  # normalised


def test_ranks_get_disjoint_shards():
    data = load_dataset("cifar10-mini", train_subset=100)
    shards = [make_loader(data, "train", 10, FakeFabric(rank, 2), seed=0).indices(0) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert len(set(shards[0].tolist()) | set(shards[1].tolist())) == 100
    tests = [make_loader(data, "test", 10, FakeFabric(rank, 2)).indices(0) for rank in (0, 1)]
    assert sorted(torch.cat(tests).tolist()) == list(range(1000))


def test_crop_with_padding_and_flip():
    image = torch.arange(8 * 8, dtype=torch.uint8).view(1, 1, 8, 8).expand(64, 3, 8, 8).contiguous()
    out = augment(image, 8, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(image[0, 0].float(), (1, 1, 1, 1))
    windows = {padded[y:y + 8, x:x + 8] for y in range(3) for x in range(3)}
    windows = [w for w in windows] + [w.flip(-1) for w in windows]
    for sample in out:
        assert any(torch.equal(sample[0], w) for w in windows)  # a shifted, maybe mirrored window
    assert len({tuple(s[0].flatten().tolist()) for s in out}) > 5  # and they differ


def test_random_resized_crop_for_large_images():
    images = torch.randint(0, 256, (4, 3, 80, 80), dtype=torch.uint8)
    out = augment(images, 64, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 64, 64) and out.min() >= 0 and out.max() <= 255


def write_folder(root, sizes=((40, 30), (32, 32)), grayscale_every=3):
    """A small ImageFolder of real CIFAR images, some grayscale, of several sizes."""
    data = load_dataset("cifar10-mini")
    for split, source in (("train", data["train"]), ("val", data["test"])):
        for c in range(3):
            folder = root / split / data["classes"][c]
            folder.mkdir(parents=True)
            picks = torch.nonzero(source[1] == c).flatten()[:6]
            for i, index in enumerate(picks):
                image = Image.fromarray(source[0][index].permute(1, 2, 0).numpy())
                image = image.resize(sizes[i % len(sizes)])
                if i % grayscale_every == 0:
                    image = image.convert("L")
                image.save(folder / f"{i}.jpg")
    return root


def test_image_folder_in_memory(tmp_path):
    write_folder(tmp_path)
    data = load_dataset("imagefolder", tmp_path, img_size=32)
    assert data["train"][0].shape == (18, 3, 32, 32) and data["train"][0].dtype == torch.uint8
    assert data["test"][0].shape == (18, 3, 32, 32)
    assert torch.bincount(data["train"][1]).tolist() == [6, 6, 6]
    assert data["classes"] == ["airplane", "automobile", "bird"]
    images, labels = next(make_loader(data, "train", 8, FakeFabric(), seed=0).epoch(0))
    assert images.shape == (8, 3, 32, 32)


def test_image_folder_streamed(tmp_path, monkeypatch):
    write_folder(tmp_path)
    monkeypatch.setattr(data_module, "IN_MEMORY_BYTES", 0)
    data = load_dataset("imagefolder", tmp_path, img_size=48)
    assert data.get("streamed")
    assert make_loader(data, "train", 4, FakeFabric(), seed=0, workers=3).loader.num_workers == 3  # --workers
    loader = make_loader(data, "train", 4, FakeFabric(), seed=0)
    loader.loader.num_workers = 0
    images, labels = next(loader.epoch(0))
    assert images.shape == (4, 3, 48, 48) and labels.shape == (4,)


def test_streamed_workers_send_uint8_and_the_device_normalises_as_torchvision(tmp_path, monkeypatch):
    write_folder(tmp_path)
    monkeypatch.setattr(data_module, "IN_MEMORY_BYTES", 0)
    data = load_dataset("imagefolder", tmp_path, img_size=32)
    # the file list is one array of encoded paths, which forked workers read without copying it
    assert isinstance(data["train"][0], np.ndarray) and data["train"][0].dtype.kind == "S"
    assert len(hold_out(data, 0.5, seed=0)["val"][0]) == 9
    for split in ("train", "test"):
        sent, _ = next(iter(make_loader(data, split, 4, FakeFabric(), workers=0).loader))
        assert sent.dtype == torch.uint8  # a quarter of float32's bytes between processes and to the device
    # normalised on the device to the numbers torchvision's ToTensor and Normalize give in a worker
    transform = default_transform(data, train=False)
    expected = torch.stack([transform(read_rgb(path)) for path in data["test"][0]])
    batches = list(make_loader(data, "test", 4, FakeFabric(), workers=0).epoch())
    assert torch.equal(torch.cat([images for images, _ in batches])[:18], expected)


def test_default_workers_share_this_process_cores_among_the_ranks_on_the_machine(monkeypatch):
    data = {"train": (torch.zeros(16, 3, 8, 8, dtype=torch.uint8), torch.zeros(16, dtype=torch.int64)),
            "classes": ["a", "b"], "mean": (0.5,) * 3, "std": (0.5,) * 3, "img_size": 8}
    workers = lambda fabric: make_loader(data, "train", 2, fabric, transform=T.PILToTensor()).loader.num_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))  # the cores a scheduler gave us
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert workers(FakeFabric()) == 8  # at most 8
    assert workers(FakeFabric(0, 4)) == 3  # four ranks, all here
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 of the 8 ranks on this machine
    assert workers(FakeFabric(0, 8)) == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert workers(FakeFabric(0, 8)) == 1


def test_on_cuda_the_next_batch_is_copied_while_the_current_one_trains(monkeypatch):
    """No GPU needed: the streams are stand-ins that log what the loader asks of them."""
    log, current, batches = [], [], iter(range(10))

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

    class Copy:
        def __init__(self, batch):
            self.batch = batch

        def record_stream(self, stream):
            log.append(f"{self.batch} kept for {stream.name}")

    @contextlib.contextmanager
    def on(stream):
        current.append(stream.name)
        yield
        current.pop()

    def to_device(images, labels):
        batch = next(batches)
        log.append(f"copy {batch} on {current[-1] if current else 'main'}")
        return Copy(batch), Copy(batch)

    main, side = Stream("main"), Stream("side")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)
    monkeypatch.setattr(torch.cuda, "stream", on)
    data = {"train": (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)),
            "classes": ["a", "b"], "mean": (0.5,) * 3, "std": (0.5,) * 3, "img_size": 8}
    loader = make_loader(data, "train", 2, FakeFabric(), transform=T.PILToTensor(), workers=0)
    loader.device = torch.device("cuda")
    monkeypatch.setattr(loader, "to_device", to_device)
    for images, _ in loader.epoch():
        log.append(f"train on {images.batch}")
    assert log == ["copy 0 on side", "main waits for side", "0 kept for main", "0 kept for main",
                   "copy 1 on side", "train on 0",
                   "main waits for side", "1 kept for main", "1 kept for main", "train on 1"]


def test_image_folder_test_split_and_subset(tmp_path, monkeypatch):
    """Without val/ the test/ folder is evaluated on; a --train-subset decodes only its images."""
    write_folder(tmp_path)
    (tmp_path / "val").rename(tmp_path / "test")
    decoded = []
    original = data_module._decode_all
    monkeypatch.setattr(data_module, "_decode_all",
                        lambda paths, *size: decoded.append(len(paths)) or original(paths, *size))
    data = load_dataset("imagefolder", tmp_path, img_size=32, train_subset=6, seed=1)
    assert decoded == [6, 18]  # the chosen training images, then the whole test split
    assert torch.bincount(data["train"][1]).tolist() == [2, 2, 2] and len(data["test"][1]) == 18
    whole = load_dataset("imagefolder", tmp_path, img_size=32)
    assert torch.equal(subset(whole, 6, seed=1)["train"][0], data["train"][0])  # the same images as before
    (tmp_path / "test").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="neither val/ nor test/"):
        load_dataset("imagefolder", tmp_path, img_size=32)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "nowhere")
    with pytest.raises(UserError, match="needs --data-dir"):
        load_dataset("imagefolder")
    write_folder(tmp_path)
    (tmp_path / "train" / "empty_class").mkdir()
    with pytest.raises(UserError, match="empty_class has no images"):
        load_dataset("imagefolder", tmp_path, img_size=32)
    (tmp_path / "train" / "empty_class").rmdir()
    corrupt = tmp_path / "train" / "bird" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(UserError, match=r"cannot read image .*broken.jpg: cannot identify image file "
                                         r"\(UnidentifiedImageError\)$"):
        load_dataset("imagefolder", tmp_path, img_size=32)


def test_cifar_offline_and_missing(tmp_path):
    with pytest.raises(UserError, match="could not be downloaded"):
        load_dataset("cifar10", tmp_path)


def test_device_loader_test_split_covers_everything():
    data = load_dataset("cifar10-mini")
    loader = DeviceLoader(data["test"], data, 300, torch.device("cpu"), train=False)
    batches = [labels for _, labels in loader.epoch()]
    # every batch has one shape (a compiled model never recompiles); the last is filled up with PADDING labels
    assert len(loader) == 4 and [len(labels) for labels in batches] == [300] * 4
    last = batches[-1]
    assert (last[:100] != PADDING).all() and (last[100:] == PADDING).all()
    assert torch.equal(torch.cat(batches)[:1000], data["test"][1])


def test_streamed_test_split_counts_every_image_once_under_ddp(tmp_path, monkeypatch):
    write_folder(tmp_path)  # 3 classes × 6 test images: 18, which 5 ranks do not divide
    monkeypatch.setattr(data_module, "IN_MEMORY_BYTES", 0)
    data = load_dataset("imagefolder", tmp_path, img_size=32)
    seen = []
    for rank in range(5):
        loader = make_loader(data, "test", 2, FakeFabric(rank, 5))
        loader.loader.num_workers = 0
        batches = [labels for _, labels in loader.epoch()]
        assert all(len(labels) == 2 for labels in batches)  # padded to one shape
        seen += [label for labels in batches for label in labels.tolist() if label != PADDING]
    assert sorted(seen) == sorted(data["test"][1].tolist())


def test_probe_split_is_fixed_and_class_balanced():
    data = load_dataset("cifar10-mini", train_subset=300)
    probe = probe_split(data, seed=0, size=100)
    assert torch.bincount(probe["test"][1]).tolist() == [10] * 10
    assert torch.equal(probe["test"][0], probe_split(data, seed=0, size=100)["test"][0])
    assert len(probe_split(data)["test"][1]) == 300  # at most the training set
