"""Models by name: timm ViTs and DeiTs, CIFAR ResNets, and any other timm model.

Nothing is downloaded: weights start random unless `load_pretrained` reads a local
file, which it does the way timm does (resampling position and patch embeddings).
Weights files and checkpoints are read with `weights_only=True`: a downloaded
file cannot run code.
A DeiT (`deit_*`) has a distillation token and returns `(class_logits,
distill_logits)` in training; in eval mode it returns their average, which is
the model's prediction (DeiT, section 5).

Used by the four scripts, bench.py and common/landscape.py.
"""
import math
import os
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.launch import UserError

# alias -> (timm name, overrides). The `mini`/`micro` sizes are for quick CPU runs.
VIT_ALIASES = {
    "vit_micro": ("vit_tiny_patch16_224", dict(embed_dim=64, depth=4, num_heads=2)),
    "vit_mini": ("vit_tiny_patch16_224", dict(embed_dim=128, depth=6, num_heads=4)),
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "deit_micro": ("deit_tiny_distilled_patch16_224", dict(embed_dim=64, depth=4, num_heads=2)),
    "deit_mini": ("deit_tiny_distilled_patch16_224", dict(embed_dim=128, depth=6, num_heads=4)),
    "deit_tiny": ("deit_tiny_distilled_patch16_224", {}),
    "deit_small": ("deit_small_distilled_patch16_224", {}),
    "deit_base": ("deit_base_distilled_patch16_224", {}),
}
CIFAR_RESNET_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)
# TAKD's plain CNNs (Mirzadeh et al. 2020, widths as in the authors' code): blocks
# of 3×3 conv–BN–ReLU layers, each block ended by a 2×2 max-pool, then hidden FC
# layers and the classifier; the number counts the conv layers. Data sets of more
# than 10 classes get the authors' wider CIFAR-100 variants (their plain6 for
# CIFAR-100 lacks the last max-pool; here every block has one).
#   name: {10: (conv widths per block, hidden FC widths) up to 10 classes, 100: above}
PLAIN_CNNS = {
    "plain2": {10: ([[16], [16]], []), 100: ([[32], [32]], [])},
    "plain4": {10: ([[16, 16], [32, 32]], []), 100: ([[32, 32], [64, 64]], [])},
    "plain6": {10: ([[16, 16], [32, 32], [64, 64]], []), 100: ([[32, 32], [64, 64], [128, 128]], [])},
    "plain8": {10: ([[16, 16], [32, 32], [64, 64], [128, 128]], [64]),
               100: ([[32, 32], [64, 64], [128, 128], [256, 256]], [64])},
    "plain10": {10: ([[32, 32], [64, 64], [128, 128], [256] * 4], [128]),
                100: ([[32, 32], [64, 64], [128, 128], [256] * 4], [512])},
}
ABN_ALIASES = [f"resnet{d}_abn" for d in CIFAR_RESNET_DEPTHS] + ["resnet18_abn"]
ALIASES = list(VIT_ALIASES) + [f"resnet{d}" for d in CIFAR_RESNET_DEPTHS] + list(PLAIN_CNNS) + ABN_ALIASES


def add_model_module_flag(parser):
    """--model-module, in every script: the modules import_model_modules imports."""
    parser.add_argument("--model-module", nargs="+", default=[],
                        help="import these modules first: models they register with timm's @register_model "
                             "can then be named (e.g. mypkg.models)")


def import_model_modules(modules):
    """Import `modules` (--model-module: a module name, or the path of a .py file):
    a model registered there with timm's `@register_model` can then be named like
    any timm model."""
    import importlib
    import importlib.util
    import sys

    for module in modules:
        try:
            if module.endswith(".py") or os.path.sep in module:
                if not os.path.isfile(module):
                    raise UserError(f"--model-module {module}: no such file")
                name = Path(module).stem
                spec = importlib.util.spec_from_file_location(name, module)
                sys.modules[name] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(sys.modules[name])
            else:
                importlib.import_module(module)
        except ImportError as error:
            raise UserError(f"--model-module {module}: cannot import it ({error})") from None
        except SyntaxError as error:
            raise UserError(f"--model-module {module}: cannot import it: {error.msg} ({error.filename}, line "
                            f"{error.lineno})") from None
        except UserError:
            raise
        except Exception as error:  # the module's own code failed
            raise UserError(f"--model-module {module}: importing it raised {type(error).__name__}: {error}") from None


def create_model(name, num_classes, img_size, patch_size=None, drop_path=0.0, device=None):
    """A model by alias (see ALIASES) or timm name, for `img_size` inputs, made on
    `device` (default: the CPU, with kernels that suit any device).

    ViT patch size follows the image size (4 up to 64 pixels, else 16) unless given.
    """
    with torch.device(device or "cpu"):
        model = _build(name, num_classes, img_size, patch_size, drop_path)
    if device is not None and torch.device(device).type == "cpu":
        # On the CPU, PyTorch's fused (flash) attention kernel is slow for short
        # sequences: its backward took 30 % of a vit_tiny step at 65 tokens; timm's
        # explicit matmul-softmax attention makes the step 1.4x faster there.
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    return model


def default_patch_size(img_size):
    """A ViT's patch size unless given: 4 pixels up to 64-pixel images, else 16."""
    return 4 if img_size <= 64 else 16


def _build(name, num_classes, img_size, patch_size, drop_path):
    if name in VIT_ALIASES:
        timm_name, overrides = VIT_ALIASES[name]
        patch_size = patch_size or default_patch_size(img_size)
        if img_size % patch_size:
            raise UserError(f"--patch-size {patch_size} does not divide the image size {img_size}")
        model = timm.create_model(timm_name, num_classes=num_classes, img_size=img_size, patch_size=patch_size,
                                  drop_path_rate=drop_path, **overrides)
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # else timm averages both heads in training too
    elif name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in CIFAR_RESNET_DEPTHS:
        model = CifarResNet(int(name[6:]), num_classes)
    elif name in ABN_ALIASES:
        model = AttentionBranchNetwork.cifar(int(name[6:-4]), num_classes) if name != "resnet18_abn" \
            else AttentionBranchNetwork.resnet18(num_classes)
    elif name in PLAIN_CNNS:
        blocks, hidden = PLAIN_CNNS[name][10 if num_classes <= 10 else 100]
        model = PlainCNN(blocks, hidden, num_classes, img_size)
    elif timm.is_model(name):
        model = _timm_model(name, num_classes, img_size, drop_path)
    else:
        import difflib

        close = difflib.get_close_matches(name, ALIASES + timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"unknown model {name!r}: {hint}use one of {', '.join(ALIASES)} or a timm model name")
    return model


def _timm_model(name, num_classes, img_size, drop_path):
    """A timm model, or one registered with --model-module, checked on one blank
    image: one line, not a traceback mid-training, when it cannot be built, cannot
    take `img_size` inputs, or does not answer with `num_classes` classes."""
    try:
        try:
            model = timm.create_model(name, num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path)
        except TypeError:  # CNNs take no img_size
            model = timm.create_model(name, num_classes=num_classes, drop_path_rate=drop_path)
        with torch.no_grad():
            output = model.eval()(torch.zeros(1, 3, img_size, img_size))
        model.train()
    except Exception as error:
        raise UserError(f"model {name!r} fails at {img_size} px with {num_classes} classes: {type(error).__name__}: "
                        f"{' '.join(str(error).split())[:200]}") from None
    classes = (output[0] if isinstance(output, tuple) else output).shape[-1]
    if classes != num_classes:
        raise UserError(f"model {name!r} answers with {classes} classes, and the data set has {num_classes}")
    return model


def read_state_dict(path):
    """The weights in a `.pth`/`.safetensors` file or a run folder's checkpoint (its first model)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read weights {path}: {type(error).__name__}") from None
    for key in ("model", "student0", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            if key == "student0" and "student1" in state:
                print(f"note: {path} holds {sum(k.startswith('student') for k in state)} students of a dml.py run; "
                      f"its student 0 is taken")
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of weights")
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).all() if floats else True
    if not finite:  # one read of all the tensors' checks
        bad = [k for k, v in floats.items() if not torch.isfinite(v).all()]
        raise UserError(f"weights {path} are NaN or infinite in {len(bad)} of {len(state)} tensors ({bad[0]}, ...): "
                        f"not used")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_weights(model, path, state=None):
    """Load all weights from `path` (see read_state_dict; `state` if already read) into `model`, exactly."""
    state = read_state_dict(path) if state is None else state
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
        raise UserError(f"weights {path} do not fit {type(model).__name__}: {first.strip()}") from None


def load_pretrained(model, path):
    """Start `model` from the weights in `path` as timm does: the model's own
    checkpoint filter resamples position and patch embeddings to this resolution
    and patch size; what still does not fit (a classifier for other classes)
    keeps its initial values. Refuses a file that mostly does not fit. Returns
    the report {file, loaded, resampled, skipped}."""
    import sys

    state = file = read_state_dict(path)
    own = model.state_dict()
    if "dist_token" in own and "dist_token" not in state and "pos_embed" in state:
        # a ViT file into a DeiT: one prefix token against two. The distillation
        # token's position starts as the class token's, so the grid lines up
        # and is resampled below; the token itself keeps its initial value.
        positions = state["pos_embed"]
        if math.isqrt(positions.shape[1] - 1) ** 2 == positions.shape[1] - 1:
            state = {**state, "pos_embed": torch.cat([positions[:, :1], positions], dim=1)}
    checkpoint_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    filtered = state
    if checkpoint_filter is not None:
        try:
            filtered = checkpoint_filter(dict(state), model)
        except Exception:  # a file of another architecture: judged below
            pass
    fits = {key: value for key, value in filtered.items() if key in own and value.shape == own[key].shape}
    if len(fits) < len(own) / 2:
        raise UserError(f"--pretrained {path} does not fit {type(model).__name__}: only {len(fits)} of its "
                        f"{len(own)} tensors match")
    model.load_state_dict(fits, strict=False)
    resampled = sorted(key for key in fits if key in file and file[key].shape != fits[key].shape)
    return {"file": str(path), "loaded": len(fits), "resampled": resampled, "skipped": sorted(set(own) - set(fits))}


def describe_pretrained(report):
    """One line for the log."""
    return (f"pretrained {report['file']}: {report['loaded']} tensors loaded, resampled: "
            f"{', '.join(report['resampled']) or 'none'}; left at their initial values: "
            f"{', '.join(report['skipped']) or 'none'}")


def model_name_in(path):
    """The model a checkpoint of this project was made for (deit.py's, takd.py's
    network, dml.py's first student), or None for a bare weights file."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("args"), dict):
        return None
    args = raw["args"]
    return raw.get("model_name") or args.get("model") or (args.get("students") or [None])[0]


def save_weights(path, model, name=None, data=None, patch_size=None):
    """The weights of a trained `model` as safetensors (group-readable), loadable
    with `load_state_dict(strict=True)` into the same model made by create_model.
    Given the model's `name` and its `data` set, the file's metadata says how to
    rebuild it without this project (`weights_metadata`)."""
    import os

    from safetensors.torch import save_file

    model = getattr(model, "module", model)  # Fabric's wrapper, or timm's ModelEmaV3
    model = getattr(model, "_orig_mod", model)  # torch.compile's
    metadata = weights_metadata(name, data, patch_size) if name is not None else None
    tmp = Path(str(path) + ".tmp")
    save_file({key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}, str(tmp),
              metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def weights_metadata(name, data, patch_size=None):
    """safetensors metadata (strings) of a model made by create_model(name, ...) for
    `data`: the alias, the classes, image size and normalisation, and for the ViTs
    the `timm.create_model` call that rebuilds it (`timm_model`, `timm_kwargs`)."""
    import json

    img_size = data["img_size"]
    metadata = {"model": name, "num_classes": str(len(data["classes"])), "classes": json.dumps(data["classes"]),
                "img_size": str(img_size), "mean": json.dumps(list(data["mean"])),
                "std": json.dumps(list(data["std"])), "made_by": "common.models.create_model"}
    if name in VIT_ALIASES:
        timm_name, overrides = VIT_ALIASES[name]
        kwargs = dict(num_classes=len(data["classes"]), img_size=img_size,
                      patch_size=patch_size or default_patch_size(img_size), **overrides)
        metadata.update(timm_model=timm_name, timm_kwargs=json.dumps(kwargs))
    elif name not in ALIASES:  # any timm model
        metadata.update(timm_model=name, timm_kwargs=json.dumps(dict(num_classes=len(data["classes"]))))
    return metadata


def load_teacher(name, path, num_classes, img_size, patch_size=None, device=None):
    """A frozen teacher from `path`, in eval mode, on `device`; refuses weights made
    for another number of classes."""
    model = create_model(name, num_classes, img_size, patch_size, device=device)
    state = read_state_dict(path)
    head = next((k for k in reversed(list(state)) if k.endswith("weight") and state[k].ndim == 2), None)
    if head is not None and state[head].shape[0] != num_classes and head in model.state_dict():
        raise UserError(f"teacher {path} was trained for {state[head].shape[0]} classes, the data set has "
                        f"{num_classes}")
    load_weights(model, path, state=state)
    return model.eval().requires_grad_(False)


def weight_decay_groups(model, weight_decay):
    """AdamW parameter groups as in timm and DeiT: weight decay for the weights of
    linear and conv layers, none for norms, biases, position embeddings and the
    class/distillation tokens (the model's `no_weight_decay()`)."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def freeze(model, dtype=torch.float32, compile=False):
    """A network that only infers (a teacher): eval mode, no gradients, held in
    `dtype` (bf16 in a bf16-mixed run: half the memory and bandwidth), compiled
    on request. Feed it images of that dtype."""
    model = model.eval().requires_grad_(False)
    if dtype != torch.float32:
        model = model.to(dtype)
    return torch.compile(model) if compile else model


def has_distillation_token(model):
    return getattr(model, "dist_token", None) is not None


@contextmanager
def both_heads(model):
    """In eval mode a DeiT returns the average of its heads; inside this context it
    returns both, while everything else (drop-path, BN) stays in eval mode."""
    distilled = [m for m in model.modules() if hasattr(m, "set_distilled_training")]
    for module in distilled:
        module.training = True
    try:
        yield
    finally:
        for module in distilled:
            module.training = False


def split_heads(output):
    """(class_logits, distill_logits); a model with one head uses it for both."""
    return output if isinstance(output, tuple) else (output, output)


def prediction(output):
    """The model's prediction: for a DeiT in training, the average of its two heads."""
    class_logits, distill_logits = split_heads(output)
    return (class_logits + distill_logits) / 2 if isinstance(output, tuple) else output


def agreeing_pairs(logits, labels):
    """How many images two networks classify alike, averaged over the pairs of
    `logits` (one tensor per network): with the number of images, the
    `agreement` of students or nodes. Padding images (label < 0) are left out."""
    classes = torch.stack([scores.argmax(1) for scores in logits])
    same = (classes[:, None] == classes[None, :]) & (labels >= 0)
    off_diagonal = same.sum() - same.diagonal(dim1=0, dim2=1).sum()  # each pair twice
    return off_diagonal / (len(logits) * (len(logits) - 1))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- CIFAR ResNets (He et al., CVPR 2016, section 4.2): 6n+2 layers, 16/32/64 channels ---


class BasicBlock(nn.Module):
    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:  # projection shortcut (option B)
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_stage(in_channels, channels, blocks, stride):
    return nn.Sequential(*[BasicBlock(in_channels if b == 0 else channels, channels, stride if b == 0 else 1)
                           for b in range(blocks)])


class CifarResNet(nn.Module):
    def __init__(self, depth, num_classes):
        super().__init__()
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, in_channels = [], 16
        for stage, channels in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(BasicBlock(in_channels, channels, 2 if stage > 0 and b == 0 else 1))
                in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PlainCNN(nn.Module):
    """TAKD's plain CNN: `blocks` of 3×3 conv–BN–ReLU widths, each block ending in a
    2×2 max-pool, the flattened map through `hidden` FC–ReLU layers, then the classifier."""

    def __init__(self, blocks, hidden, num_classes, img_size):
        super().__init__()
        layers, channels = [], 3
        for widths in blocks:
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = img_size // 2 ** len(blocks)
        if side < 1:
            raise UserError(f"{img_size}-pixel images are too small for {len(blocks)} max-pools")
        classifier, width = [nn.Flatten()], channels * side * side
        for out in hidden:
            classifier += [nn.Linear(width, out), nn.ReLU()]
            width = out
        self.classifier = nn.Sequential(*classifier, nn.Linear(width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class AttentionBranchNetwork(nn.Module):
    """Attention Branch Network (Fukui et al., CVPR 2019) on a ResNet.

    The attention branch repeats the last ResNet stage at stride 1 on the
    features before it, turns them into K class maps (BN, 1×1 conv, BN, ReLU),
    and from those into the attention logits (1×1 conv, global average) and one
    attention map (3×3 conv, BN, sigmoid). The perception branch runs the last
    stage on the features weighted by the map, residually: x·M + x.

    forward: (perception logits, attention logits, attention map B×H×W);
    the map is 16×16 for a CIFAR ResNet at 32 pixels, 14×14 for resnet18 at 224.
    """

    def __init__(self, stem, front, attention_stage, perception_stage, channels, num_classes):
        super().__init__()
        self.stem, self.front = stem, front
        self.attention_stage = attention_stage
        self.class_maps = nn.Sequential(nn.BatchNorm2d(channels), nn.Conv2d(channels, num_classes, 1, bias=False),
                                        nn.BatchNorm2d(num_classes), nn.ReLU())
        self.attention_head = nn.Conv2d(num_classes, num_classes, 1, bias=False)
        self.map_head = nn.Sequential(nn.Conv2d(num_classes, 1, 3, padding=1, bias=False), nn.BatchNorm2d(1),
                                      nn.Sigmoid())
        self.perception_stage = perception_stage
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @classmethod
    def cifar(cls, depth, num_classes):
        """On the CIFAR ResNet of `depth` (6n+2): the branch starts after the 32-channel stage.

        Basic blocks at every depth, as in the CIFAR ResNets of He et al. and this
        project's `resnet<depth>`, so that `resnet56_abn` and `resnet56` differ only
        by the attention branch. The official ABN code switches to bottleneck
        blocks from depth 44 (9n+2 layers, 4× wider outputs); its resnet110_abn is
        therefore a different, larger network than this one."""
        n = (depth - 2) // 6
        stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        front = nn.Sequential(resnet_stage(16, 16, n, 1), resnet_stage(16, 32, n, 2))
        return cls(stem, front, resnet_stage(32, 64, n, 1), resnet_stage(32, 64, n, 2), 64, num_classes)

    @classmethod
    def resnet18(cls, num_classes):
        """On ResNet-18 (He et al. 2016) for 224-pixel images: the branch starts after the third stage."""
        stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.MaxPool2d(3, 2, 1))
        front = nn.Sequential(resnet_stage(64, 64, 2, 1), resnet_stage(64, 128, 2, 2), resnet_stage(128, 256, 2, 2))
        return cls(stem, front, resnet_stage(256, 512, 2, 1), resnet_stage(256, 512, 2, 2), 512, num_classes)

    def forward(self, x):
        x = self.front(self.stem(x))
        class_maps = self.class_maps(self.attention_stage(x))
        attention_logits = self.attention_head(class_maps).mean((2, 3))
        attention = self.map_head(class_maps)
        features = self.perception_stage(x * attention + x)
        return self.fc(features.mean((2, 3))), attention_logits, attention[:, 0]
