"""The GPU path, checked without a GPU.

Under torch's FakeTensorMode, tensors made with device="cuda" exist without a
GPU (shapes, dtypes and devices, no data), and an operation that mixes them with
CPU tensors raises. So each script's model and teacher set-up, one training
step's losses and its evaluation bookkeeping run here "on CUDA"; they can go
as far as the conversion to Python numbers, which has no data to convert, and
build the backward graph (running it needs a real CUDA device; the gradients
themselves are checked on the CPU in the other tests).
"""
import argparse
import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.overrides import TorchFunctionMode

import common.data
import common.folder
import common.launch
import deit
import dml
import ktg_ensemble
import takd
from common.graph import preset
from common import models
from common.loop import TrainLog
from common.models import create_model, freeze, load_teacher, read_state_dict
from conftest import ROOT, FakeFabric, free_port, results, run_main

CUDA = FakeFabric(device="cuda")


class OneDevicePerOp(TorchFunctionMode):
    """Stricter than FakeTensorMode, which lets a CPU scalar into a CUDA operation
    (as CUDA does for 0-dim tensors, but not once such a tensor is stacked): any
    call that gets tensors on two devices raises, but for copies between them and
    torch's internals (indexing a CUDA tensor with CPU indices is allowed)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in ("to", "copy_", "cpu", "cuda") and not name.startswith("_"):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            devices = {t.device.type for t in tensors}
            if len(devices) > 1:
                raise RuntimeError(f"{getattr(func, '__name__', func)} mixes devices {sorted(devices)}")
        return func(*args, **kwargs)


def fake_cuda():
    """The context the tests below run in: fake CUDA tensors, one device per operation."""
    stack = contextlib.ExitStack()
    stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
    stack.enter_context(OneDevicePerOp())
    return stack


class CudaBatches:
    """A loader of random CUDA batches (fake ones under FakeTensorMode)."""

    def __init__(self, batches=2, size=4, classes=10):
        self.batches, self.size, self.classes = batches, size, classes

    def epoch(self, epoch=0):
        for _ in range(self.batches):
            yield (torch.randn(self.size, 3, 32, 32, device="cuda"),
                   torch.randint(0, self.classes, (self.size,), device="cuda"))


def on_cuda(model):
    """A CPU model moved to CUDA, as fabric.setup does (under FakeTensorMode: fake CUDA tensors)."""
    return model.to("cuda")


def reaches_python_numbers(function, *args):
    """Run `function` on fake CUDA tensors: it must fail only where it turns a
    result into Python numbers, not on a device mismatch before that."""
    with pytest.raises(DataDependentOutputException):
        function(*args)


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet8.pth"
    torch.save(create_model("resnet8", 10, 32).state_dict(), path)
    return path


def test_deit_teacher_predictions_on_cuda():
    teacher = create_model("resnet8", 10, 32)
    with fake_cuda():
        teacher = freeze(on_cuda(teacher))
        # defect 1: the teacher's accuracy stacked a CUDA count with a CPU one
        decisions, teacher_top1 = deit.teacher_predictions(teacher, CudaBatches(), CUDA)
        assert teacher_top1.device.type == "cuda" and decisions[0].device.type == "cuda"


def test_deit_teacher_student_and_evaluation_on_cuda(teacher_file, monkeypatch):
    state = read_state_dict(teacher_file)  # read here: fake tensors have no values to check for NaN
    monkeypatch.setattr(models, "read_state_dict", lambda path: state)
    student = create_model("deit_micro", 10, 32)
    with fake_cuda():
        teacher = freeze(load_teacher("resnet8", teacher_file, 10, 32, device="cuda"))
        assert next(teacher.parameters()).device.type == "cuda"
        decisions, _ = deit.teacher_predictions(teacher, CudaBatches(), CUDA)
        student = on_cuda(student).train()
        images, labels = next(CudaBatches().epoch())
        for kind in ("hard", "soft", "none"):
            args = argparse.Namespace(distillation_type=kind, distillation_alpha=0.5, distillation_tau=1.0,
                                      smoothing=0.1)
            loss = sum(deit.student_loss(student(images), teacher(images), labels, args).values())
            assert loss.device.type == "cuda" and loss.grad_fn is not None
        reaches_python_numbers(deit.evaluate, student, CudaBatches(), CUDA, decisions)


def test_takd_loaded_teacher_and_kd_step_on_cuda(teacher_file, monkeypatch):
    state = read_state_dict(teacher_file)  # read here: fake tensors have no values to check for NaN
    monkeypatch.setattr(models, "read_state_dict", lambda path: state)
    student = create_model("plain2", 10, 32)
    with fake_cuda():
        # defect 2: --teacher-ckpt's network stayed on the CPU
        teacher = freeze(load_teacher("resnet8", teacher_file, 10, 32, device="cuda"))
        reaches_python_numbers(takd.evaluate, teacher, CudaBatches(), CUDA)
        student = on_cuda(student).train()
        images, labels = next(CudaBatches().epoch())
        with torch.no_grad():
            teacher_logits = teacher(images)
        loss = sum(takd.kd_loss(student(images), teacher_logits, labels, 0.9, 4.0).values())
        assert loss.device.type == "cuda" and loss.grad_fn is not None
        reaches_python_numbers(takd.evaluate, student, CudaBatches(), CUDA)


def test_dml_students_and_evaluation_on_cuda():
    students = [create_model("vit_micro", 10, 32), create_model("deit_micro", 10, 32), create_model("resnet8", 10, 32)]
    with fake_cuda():
        students = [on_cuda(student).train() for student in students]
        images, labels = next(CudaBatches().epoch())
        for mode in ("dml", "independent"):
            args = argparse.Namespace(mode=mode, smoothing=0.1, dml_target="prediction")
            terms = dml.student_losses(students, images, labels, args)
            assert len(terms) == (6 if mode == "dml" else 3)  # ce_k (and kl_k) for each of the 3 students
            assert all(term.device.type == "cuda" and term.grad_fn is not None for term in terms.values())
        reaches_python_numbers(dml.evaluate, students, CudaBatches(), CUDA)


def test_ktg_graph_loss_and_evaluation_on_cuda():
    nodes = [create_model("resnet8_abn", 10, 32), create_model("resnet8_abn", 10, 32)]
    graph = preset("dml", ["resnet8_abn"] * 2)
    graph["edges"][2].update(loss="both_repel", gate="correct")
    with fake_cuda():
        nodes = [on_cuda(node).train() for node in nodes]
        images, labels = next(CudaBatches().epoch())
        outputs = [ktg_ensemble.node_outputs(node, images) for node in nodes]
        loss = sum(ktg_ensemble.graph_loss(graph, outputs, labels, 1, 10, (3, 7)).values())
        assert loss.device.type == "cuda" and loss.grad_fn is not None
        reaches_python_numbers(ktg_ensemble.evaluate, nodes, CudaBatches(), CUDA)


def test_train_log_keeps_the_losses_on_cuda_until_it_reads_them():
    with fake_cuda():
        log = TrainLog(CUDA, argparse.Namespace(epochs=1, log_every=50, logger="csv"), out=None, steps=10)
        log.begin(0)
        terms = {"ce": torch.ones((), device="cuda"), "kl": torch.ones((), device="cuda")}
        for step in range(9):  # no read before the end of the epoch
            log.step(step, sum(terms.values()), terms, 4)
        assert log.sums.device.type == "cuda"
        reaches_python_numbers(log.step, 9, sum(terms.values()), terms, 4)


# --- host syncs per training step --------------------------------------------


class SyncCounter:
    """Counts the calls of Tensor.item, .tolist, __bool__, __float__ and __int__
    wherever they are made: the project, Fabric, timm or torch. Left out: the test's
    own, and torch's optimizers' reads of their step counters, which torch keeps on
    the host on a GPU too (they are no sync there)."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.count, self.sites = 0, {}
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self.wrap(getattr(torch.Tensor, name)))

    def wrap(self, method):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/tests/" not in caller and not caller.endswith("torch/optim/optimizer.py"):
                self.count += 1
                self.sites[caller] = self.sites.get(caller, 0) + 1
            return method(tensor, *args, **kwargs)
        return counted


TWO_EPOCHS = ["--epochs", "2", "--train-subset", "200", "--batch-size", "4", "--out"]  # 50 small steps per epoch


@pytest.mark.parametrize("script, flags", [
    (dml, ["--students", "vit_micro", "resnet8"]),
    (dml, ["--students", "vit_micro", "resnet8", "--clip-grad", "1", "--model-ema", "--grad-accum-steps", "2"]),
    (deit, ["--model", "deit_micro", "--teacher", "resnet8", "--distillation-type", "hard"]),
    (deit, ["--model", "deit_micro", "--teacher", "resnet8", "--distillation-type", "hard", "--recipe", "deit",
            "--repeated-aug", "1", "--workers", "1", "--clip-grad", "1", "--model-ema"]),
    (takd, ["--chain", "plain4", "plain2"]),
    (ktg_ensemble, ["--nodes", "resnet8_abn", "resnet8_abn", "--graph", "dml"]),
], ids=["dml", "dml-clip-ema-accum", "deit", "deit-recipe-clip-ema", "takd", "ktg"])
def test_fewer_than_a_quarter_sync_per_step(tmp_path, monkeypatch, teacher_file, script, flags):
    if script is deit:
        flags = [*flags, "--teacher-ckpt", teacher_file]
    counter = SyncCounter(monkeypatch)
    with_small_test_split(monkeypatch, script)
    run_main(script, *flags, *TWO_EPOCHS, tmp_path / "run")
    steps = 2 * 50 * (2 if script is takd else 1)  # takd trains two networks
    where = ", ".join(f"{path.split('site-packages/')[-1]}: {n}" for path, n in counter.sites.items())
    assert 0 < counter.count / steps < 0.25, f"{counter.count} syncs in {steps} steps ({where})"  # > 0: it counts
    print(f"{script.__name__}: {counter.count} syncs in {steps} steps ({where})")


# --- torch.compile -----------------------------------------------------------


@pytest.fixture
def dynamo_counters(monkeypatch):
    """dynamo's counters, with torch.compile on the "aot_eager" backend: the graphs, guards and
    AOTAutograd's tracing are what the CPU tests check; inductor's code generation, 40–60 s a
    test on a cold cache, is left to tests/test_gpu.py."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_compiled_dml_has_no_graph_for_the_short_test_batch(tmp_path, dynamo_counters):
    # 1,000 test images in batches of 300: the last would have 100 without padding
    run_main(dml, "--students", "resnet8", "resnet8", "--epochs", "1", "--train-subset", "600", "--batch-size", "300",
             "--compile", "--out", tmp_path / "run")
    # one graph for training and one for evaluation, shared by the two students (same architecture)
    assert dynamo_counters["stats"]["unique_graphs"] == 2
    assert results(tmp_path / "run")["ensemble_top1"] > 0


def test_compiled_deit_with_compiled_teacher(tmp_path, teacher_file, dynamo_counters):
    run_main(deit, "--model", "deit_micro", "--teacher", "resnet8", "--teacher-ckpt", teacher_file,
             "--distillation-type", "hard", "--epochs", "1", "--train-subset", "600", "--batch-size", "300",
             "--compile", "--out", tmp_path / "run")
    # the student in training and in evaluation (both heads), the teacher on one batch shape
    assert dynamo_counters["stats"]["unique_graphs"] == 3
    res = results(tmp_path / "run")
    assert res["teacher_top1"] is not None and res["top1"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fall-back of a machine without CUDA")
def test_plain_python_runs_on_one_device():
    from common.launch import make_fabric

    fabric = make_fabric()
    assert fabric.world_size == 1 and fabric.device.type == "cpu"


# --- 16-mixed: one loss scale for all students ----------------------------------


def updates_under_loss_scaling(students, optimizers):
    """Each student's SGD (lr 1) update after one 16-mixed step through Fabric's
    precision plugin, whose loss scale doubles at every update (growth_interval 1)."""
    from lightning_fabric.plugins.precision import MixedPrecision

    precision = MixedPrecision("16-mixed", device="cpu",
                               scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1))
    before = [student.weight.detach().clone() for student in students]
    loss = sum(student(torch.ones(1, 2)).sum() for student in students)  # d loss / d weight = 1
    precision.backward(loss, None)  # scales the loss
    for optimizer in optimizers:  # as Fabric's optimizer.step() does, once per optimizer
        precision.optimizer_step(optimizer)
    return [(b - student.weight.detach()).mean().item() for b, student in zip(before, students)]


def test_one_optimizer_unscales_every_student_alike():
    torch.manual_seed(0)
    students = [torch.nn.Linear(2, 1, bias=False) for _ in range(2)]
    # the scripts' way: one optimizer, a parameter group per student
    one = torch.optim.SGD([{"params": student.parameters()} for student in students], lr=1.0)
    assert updates_under_loss_scaling(students, [one]) == pytest.approx([1.0, 1.0], rel=0.01)
    # one optimizer each: the second is unscaled with the scale the first step already doubled
    each = [torch.optim.SGD(student.parameters(), lr=1.0) for student in students]
    assert updates_under_loss_scaling(students, each) == pytest.approx([1.0, 0.5], rel=0.01)


def test_dml_keeps_one_optimizer_with_a_group_per_student(tmp_path):
    run_main(dml, "--students", "vit_micro", "resnet8", "--epochs", "1", "--train-subset", "100", "--batch-size", "50",
             "--out", tmp_path / "dml")
    saved = torch.load(tmp_path / "dml" / "last.ckpt", weights_only=False)
    sizes = [len(group["params"]) for group in saved["optimizer"]["param_groups"]]
    # two groups per student (with and without weight decay), the students' in order
    assert len(sizes) == 4 and [sizes[0] + sizes[1], sizes[2] + sizes[3]] == [
        len(list(create_model(name, 10, 32).parameters())) for name in ("vit_micro", "resnet8")]


# --- Fabric set-up on GPU machines ------------------------------------------------


class RecordedFabric:
    """Stands in for Fabric: records its arguments, runs on a (pretended) GPU."""

    def __init__(self, **kwargs):
        self.kwargs, self.launched, self.device = kwargs, False, torch.device("cuda", 0)

    def launch(self):
        self.launched = True


def test_plain_python_uses_one_gpu_and_fast_float32(monkeypatch):
    monkeypatch.setattr(common.launch, "Fabric", RecordedFabric)
    monkeypatch.setattr(common.launch, "_is_using_cli", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    matmul_precision = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", matmul_precision.append)
    fabric = common.launch.make_fabric()
    # defect 4: `python script.py` on a host with 8 GPUs took all 8
    assert fabric.kwargs["devices"] == 1 and fabric.launched
    assert torch.backends.cudnn.benchmark and matmul_precision == ["high"]
    monkeypatch.setattr(common.launch, "_is_using_cli", lambda: True)  # under `fabric run`: its flags decide
    assert "devices" not in common.launch.make_fabric().kwargs


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_default_precision_on_gpus_with_and_without_native_bf16(monkeypatch, native, expected):
    from common.launch import default_precision

    # defect 5: a V100 or T4 "supports" bf16 through emulation only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    assert default_precision() == expected


def test_attention_picture_runs_the_nodes_outside_ddp(tmp_path):
    """Defect 3: under DDP, rank 0 alone drew the picture through the DDP-wrapped
    nodes, whose forward is a collective the other ranks never join (a hang)."""
    from common.data import load_dataset

    class DistributedWrapper(torch.nn.Module):  # Fabric's wrapper of a DDP module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            raise AssertionError("a collective that the other ranks never join")

    data = load_dataset("cifar10-mini", train_subset=100)
    graph = preset("dml", ["resnet8_abn"] * 2)
    nodes = [DistributedWrapper(create_model("resnet8_abn", 10, 32)) for _ in range(2)]
    fabric = FakeFabric()
    fabric.autocast = lambda: contextlib.nullcontext()
    ktg_ensemble.attention_picture(tmp_path / "attention.png", nodes, graph, data, fabric)
    assert (tmp_path / "attention.png").is_file()


@pytest.mark.parametrize("script, flags", [
    (dml, ["--students", "resnet8", "resnet8"]), (deit, ["--model", "resnet8"]),
    (takd, ["--chain", "plain4", "plain2"]), (ktg_ensemble, ["--nodes", "resnet8_abn", "resnet8_abn"]),
])
def test_data_is_loaded_on_local_rank_zero_first(tmp_path, monkeypatch, script, flags):
    """Defect 8: every rank downloaded a torchvision data set at once."""
    import lightning_fabric

    inside = []

    @contextlib.contextmanager
    def rank_zero_first(self, local=False):
        inside.append(local)
        yield
        inside.clear()

    loaded_inside, load_dataset = [], common.data.load_dataset
    monkeypatch.setattr(lightning_fabric.Fabric, "rank_zero_first", rank_zero_first)
    monkeypatch.setattr(common.data, "load_dataset",
                        lambda *args, **kwargs: loaded_inside.append(list(inside)) or load_dataset(*args, **kwargs))
    run_main(script, *flags, "--epochs", "1", "--train-subset", "100", "--batch-size", "50", "--out", tmp_path / "run")
    assert loaded_inside == [[True]]  # loaded once, inside rank_zero_first(local=True)


# --- 16-mixed: clipping, the loss scale, the teacher's dtype -------------------------


def fp16_fabric(init_scale, backoff_factor=0.5):
    """A launched one-process Fabric in 16-mixed on the CPU (what V100s and T4s run),
    with a GradScaler starting at `init_scale`."""
    from lightning_fabric import Fabric
    from lightning_fabric.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=backoff_factor)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    fabric.launch()
    return fabric


def with_small_test_split(monkeypatch, script, size=100):
    """`script` loads its data with only the first `size` test images: a float16
    evaluation of all 1,000 would take most of a test's time on a CPU."""
    load = common.data.load_dataset

    def load_small(*args, **kwargs):
        data = load(*args, **kwargs)
        images, labels = data["test"]
        return {**data, "test": (images[:size], labels[:size])}

    monkeypatch.setattr(common.data, "load_dataset", load_small)


def weights(path):
    return {key: value for key, value in torch.load(path, weights_only=True).items()
            if key.startswith(("student", "model")) and isinstance(value, dict)}


# plain2, the smallest network: float16 is emulated on a CPU, and slow
@pytest.mark.parametrize("script, flags", [(dml, ["--students", "plain2", "plain2"]), (deit, ["--model", "plain2"])])
def test_clipping_in_16_mixed_unscales_once_and_skips_an_overflow(tmp_path, monkeypatch, script, flags):
    # The first step overflows at a loss scale of 2^30 (skipped, scale ÷ 2^20), the
    # next ones update at 2^10. A clip threshold no gradient reaches must leave every
    # weight as without clipping: unscaled twice, the updates were 2^10 times too small;
    # clipping that raised on an inf gradient stopped the run at its first step.
    monkeypatch.setattr(common.folder, "make_fabric", lambda: fp16_fabric(2.0 ** 30, backoff_factor=2.0 ** -20))
    with_small_test_split(monkeypatch, script)
    for name, clip in (("plain", []), ("clipped", ["--clip-grad", "1e9"])):
        run_main(script, *flags, "--epochs", "1", "--train-subset", "100", "--batch-size", "50", *clip,
                 "--out", tmp_path / name)
    plain, clipped = weights(tmp_path / "plain" / "last.ckpt"), weights(tmp_path / "clipped" / "last.ckpt")
    for module in plain:
        for key, value in plain[module].items():
            assert torch.equal(value, clipped[module][key]), f"{module}.{key}"
    assert torch.load(tmp_path / "plain" / "last.ckpt", weights_only=True)["loss_scale"]["scale"] == 2.0 ** 10


def test_resume_keeps_the_loss_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(common.folder, "make_fabric", lambda: fp16_fabric(2.0 ** 30, backoff_factor=2.0 ** -20))
    with_small_test_split(monkeypatch, dml)
    flags = ["--students", "plain2", "plain2", "--train-subset", "100", "--batch-size", "50", "--epochs", "2"]
    run_main(dml, *flags, "--out", tmp_path / "whole")

    def stop_after_the_first(fabric, out, state, row, *rest):
        end_epoch(fabric, out, state, row, *rest)
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    end_epoch = dml.end_epoch
    monkeypatch.setattr(dml, "end_epoch", stop_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run_main(dml, *flags, "--out", tmp_path / "resumed")
    monkeypatch.setattr(dml, "end_epoch", end_epoch)
    run_main(dml, *flags, "--out", tmp_path / "resumed", "--resume")
    # restarted at 2^30, the resumed run would skip its first step again
    whole, resumed = weights(tmp_path / "whole" / "last.ckpt"), weights(tmp_path / "resumed" / "last.ckpt")
    assert all(torch.equal(value, resumed[module][key]) for module in whole for key, value in whole[module].items())


def test_a_frozen_teacher_runs_in_the_autocast_dtype():
    from common.launch import inference_dtype

    assert inference_dtype(fp16_fabric(2.0 ** 10)) == torch.float16
    assert inference_dtype(RecordedPrecisionFabric("bf16-mixed")) == torch.bfloat16
    assert inference_dtype(RecordedPrecisionFabric("32-true")) == torch.float32


class RecordedPrecisionFabric:
    def __init__(self, precision):
        self.strategy = argparse.Namespace(precision=argparse.Namespace(precision=precision))


# --- distributed: each rank its own random numbers; rank 0 decides from files ------------

PROBE_MODULE = '''
import os, torch
from timm.models import register_model

class Probe(torch.nn.Module):
    """Writes the first training batch it sees, per rank, then classifies linearly."""
    def __init__(self, num_classes):
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)
        self.seen = False
    def forward(self, x):
        if self.training and not self.seen:
            self.seen = True
            torch.save(x.detach().cpu(), os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ['RANK']}.pt"))
        return self.head(x.mean((2, 3)))

@register_model
def probe_net(pretrained=False, num_classes=10, **kwargs):
    return Probe(num_classes)
'''


def test_ranks_draw_their_own_augmentations(tmp_path):
    # deit's recipe with repeated augmentation: the two ranks get the same images in
    # the same places; with one random stream for all, their crops, RandAugment,
    # Mixup/CutMix and erasing were the same too, and the copies pixel-identical
    (tmp_path / "probe_models.py").write_text(PROBE_MODULE)
    env = {**os.environ, "PROBE_DIR": str(tmp_path), "PYTHONPATH": str(tmp_path)}
    fabric = os.path.join(os.path.dirname(sys.executable), "fabric")
    result = subprocess.run([fabric, "run", "--accelerator", "cpu", "--devices", "2", "--main-port", str(free_port()),
                             "deit.py", "--model", "probe_net",
                             "--model-module", "probe_models", "--recipe", "deit", "--repeated-aug", "2", "--epochs",
                             "1", "--train-subset", "100", "--batch-size", "20", "--workers", "1", "--out",
                             str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert first.shape == second.shape == (10, 3, 32, 32)
    assert not torch.equal(first, second)
    assert results(tmp_path / "run")["world_size"] == 2


def test_one_seed_per_rank_and_epoch_rank_zero_as_before():
    from common.loop import seed_epoch

    draws = {}
    for rank in (0, 1):
        seed_epoch(FakeFabric(rank=rank, world_size=2), 3, 5)
        draws[rank] = torch.rand(4)
    torch.manual_seed(3 * 1000 + 5)  # a single process's seed, kept so that runs resume exactly
    assert torch.equal(draws[0], torch.rand(4)) and not torch.equal(draws[0], draws[1])


class BroadcastingFabric(FakeFabric):
    """Rank 1 of two, on a machine whose files differ from rank 0's: broadcast gives rank 0's `value`."""

    def __init__(self, rank_zero_value):
        super().__init__(rank=1, world_size=2)
        self.rank_zero_value, self.broadcasts = rank_zero_value, 0

    def broadcast(self, value, src=0):
        self.broadcasts += 1
        return self.rank_zero_value

    def barrier(self):
        pass


def test_run_folder_decision_is_rank_zeros(tmp_path):
    from common.folder import open_run_folder
    from common.launch import UserError

    args = argparse.Namespace(out=str(tmp_path / "run"), resume=False, overwrite=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("epoch\n1\n")  # this rank sees a run's file...
    fabric = BroadcastingFabric((None, False, False))  # ...rank 0 sees an empty folder: go on
    assert open_run_folder(fabric, args, "dml") == tmp_path / "run" and fabric.broadcasts == 1
    with pytest.raises(UserError, match="exists"):  # and rank 0's refusal stops this rank too
        open_run_folder(BroadcastingFabric(("run folder exists", False, False)), args, "dml")


def test_takd_compiles_every_network_of_a_long_chain(tmp_path, monkeypatch, dynamo_counters):
    import functools

    # dynamo's plain "eager" backend: the guards and the recompile limit are what is tested
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    with_small_test_split(monkeypatch, takd)
    run_main(takd, "--chain", "plain10", "plain8", "plain6", "plain4", "plain2", "--epochs", "1", "--train-subset",
             "100", "--batch-size", "50", "--compile", "--out", tmp_path / "run")
    assert [step["model"] for step in results(tmp_path / "run")["steps"]] == ["plain10", "plain8", "plain6", "plain4",
                                                                              "plain2"]
    # past the limit (8 recompiles of the plain CNNs' one forward) a frame runs eager, with a log warning only
    assert not [reason for reason in dynamo_counters["unimplemented"] if "recompile limit" in reason]
    assert dynamo_counters["frames"]["total"] == dynamo_counters["frames"]["ok"] > 0
