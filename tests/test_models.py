import pytest
import torch

from common.launch import UserError
from common.models import (ALIASES, CifarResNet, agreeing_pairs, count_parameters, create_model, load_pretrained,
                           load_weights, prediction, split_heads)


@pytest.mark.parametrize("name", ALIASES)
def test_every_alias_trains(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, img_size=32)
    model.train()
    output = model(torch.randn(2, 3, 32, 32))
    if name.endswith("_abn"):  # perception logits, attention logits, attention map
        logits, attention_logits, attention = output
        assert attention.shape[0] == 2 and attention.ndim == 3 and 0 <= attention.min() <= attention.max() <= 1
        output = (logits, attention_logits)
    if name.startswith("deit"):
        assert isinstance(output, tuple) and len(output) == 2  # both heads in training
    class_logits, distill_logits = split_heads(output)
    assert class_logits.shape == (2, 10)
    loss = class_logits.logsumexp(1).sum() + distill_logits.logsumexp(1).sum()
    loss.backward()
    assert torch.isfinite(loss)
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


def test_deit_predicts_the_average_of_its_heads():
    model = create_model("deit_micro", 10, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        expected = (model.head(features[:, 0]) + model.head_dist(features[:, 1])) / 2
        assert torch.allclose(model(x), expected, atol=1e-5)
    pair = (torch.ones(1, 2), 3 * torch.ones(1, 2))
    assert torch.equal(prediction(pair), 2 * torch.ones(1, 2))


def test_patch_size_follows_image_size():
    assert create_model("vit_micro", 10, 32).patch_embed.patch_size == (4, 4)
    assert create_model("vit_micro", 10, 224).patch_embed.patch_size == (16, 16)
    assert create_model("vit_micro", 10, 32, patch_size=8).patch_embed.patch_size == (8, 8)


def test_resnet_depth_and_parameters_grow():
    counts = [count_parameters(CifarResNet(d, 10)) for d in (8, 20, 56, 110)]
    assert counts == sorted(counts) and len(set(counts)) == 4
    # resnet20 of He et al. has 0.27M parameters
    assert 0.26e6 < counts[1] < 0.29e6


def test_unknown_model_lists_the_aliases():
    with pytest.raises(UserError, match="vit_tiny.*resnet110"):
        create_model("vit_gigantic_typo", 10, 32)


def test_any_timm_model():
    model = create_model("resnet18", 7, 64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_load_weights_roundtrip_and_mismatch(tmp_path):
    source = create_model("resnet8", 10, 32)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    target = create_model("resnet8", 10, 32)
    load_weights(target, tmp_path / "w.pth")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(UserError, match="do not fit"):
        load_weights(create_model("resnet14", 10, 32), tmp_path / "w.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_weights(target, tmp_path / "bad.pth")
    # --pretrained: a new head (100 classes) keeps its fresh init, the rest loads
    other = create_model("resnet8", 100, 32)
    report = load_pretrained(other, tmp_path / "w.pth")
    assert torch.equal(other.stem[0].weight, source.stem[0].weight)
    assert report["skipped"] == ["fc.bias", "fc.weight"] and report["resampled"] == []


def test_cpu_attention_matches_the_fused_kernel():
    torch.manual_seed(0)
    fused = create_model("vit_micro", 10, 32).eval()
    explicit = create_model("vit_micro", 10, 32, device="cpu").eval()
    explicit.load_state_dict(fused.state_dict())
    assert fused.blocks[0].attn.fused_attn and not explicit.blocks[0].attn.fused_attn
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fused(x), explicit(x), atol=1e-5)


def test_plain_cnns_as_in_takd():
    # TAKD's plain CNNs: the number counts the conv layers; parameters grow with depth
    for classes in (10, 100):
        models = [create_model(f"plain{depth}", classes, 32) for depth in (2, 4, 6, 8, 10)]
        convs = [sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) for model in models]
        assert convs == [2, 4, 6, 8, 10]
        counts = [count_parameters(model) for model in models]
        assert counts == sorted(counts) and len(set(counts)) == 5
        assert models[0](torch.randn(2, 3, 32, 32)).shape == (2, classes)
    # plain2 for CIFAR-10: two 3×3 convs of 16 (with BN), a linear layer on the 8×8×16 map
    assert count_parameters(create_model("plain2", 10, 32)) == (3 * 9 * 16 + 16 + 32) + (16 * 9 * 16 + 16 + 32) \
        + (8 * 8 * 16 * 10 + 10)
    assert create_model("plain4", 10, 64)(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(UserError, match="too small"):
        create_model("plain10", 10, 8)


def test_attention_branch_network():
    model = create_model("resnet20_abn", 10, 32)
    logits, attention_logits, attention = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == attention_logits.shape == (2, 10) and attention.shape == (2, 16, 16)
    # the perception branch sees the features weighted by the map: it depends on the map
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)[0]
    torch.nn.init.constant_(model.map_head[1].bias, -20.0)  # sigmoid -> 0: the attention adds nothing
    after = model(x)[0]
    assert not torch.allclose(before, after)
    resnet18 = create_model("resnet18_abn", 5, 224)
    assert resnet18(torch.randn(1, 3, 224, 224))[2].shape == (1, 14, 14)


def test_agreeing_pairs_counts_alike_predictions_per_pair():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert agreeing_pairs([a, a.clone()], torch.tensor([0, 1, 1])) == 3  # identical networks agree on every image
    assert agreeing_pairs([a, b], torch.tensor([0, 0, -100])) == 1  # the padding image is left out
    assert agreeing_pairs([a, a.clone(), b], torch.tensor([0, 0, 0])) == pytest.approx(5 / 3)  # pairs agree 3, 1, 1


def test_a_vit_file_into_a_deit_keeps_its_position_and_patch_embeddings(tmp_path):
    """The usual "DeiT student from an ImageNet ViT" start: one prefix token against two, another resolution."""
    vit = create_model("vit_micro", 10, 64, patch_size=8)  # an 8×8 grid and a class token
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    deit = create_model("deit_micro", 10, 32)  # patches of 4: an 8×8 grid, class and distillation tokens
    report = load_pretrained(deit, tmp_path / "vit.pth")
    assert {"pos_embed", "patch_embed.proj.weight"} <= set(report["resampled"])
    assert "pos_embed" not in report["skipped"] and "patch_embed.proj.weight" not in report["skipped"]
    assert "dist_token" in report["skipped"]  # a ViT has none
    positions = vit.pos_embed.detach()
    # the grid's positions carry over unchanged (the same 8×8 grid); both tokens start at the class token's
    assert torch.allclose(deit.pos_embed[:, 2:], positions[:, 1:], atol=1e-5)
    assert torch.equal(deit.pos_embed[:, 0], positions[:, 0]) and torch.equal(deit.pos_embed[:, 1], positions[:, 0])


def test_a_model_module_that_does_not_import_is_one_line(tmp_path, monkeypatch):
    from common.models import import_model_modules

    (tmp_path / "badmod.py").write_text("def net(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"--model-module badmod: cannot import it: .*badmod.py, line 1\)"):
        import_model_modules(["badmod"])
    with pytest.raises(UserError, match="--model-module nosuchmod: cannot import it"):
        import_model_modules(["nosuchmod"])
    (tmp_path / "failing.py").write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(UserError, match="^--model-module failing: importing it raised RuntimeError: no GPU here$"):
        import_model_modules(["failing"])
    with pytest.raises(UserError, match="^--model-module .*nowhere.py: no such file$"):
        import_model_modules([str(tmp_path / "nowhere.py")])


def test_a_model_module_given_as_a_file_registers_its_models(tmp_path):
    from common.models import import_model_modules

    (tmp_path / "filemodels.py").write_text(
        "import torch.nn as nn\nfrom timm.models import register_model\n\n"
        "@register_model\ndef file_mlp(pretrained=False, num_classes=10, **kwargs):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))\n")
    import_model_modules([str(tmp_path / "filemodels.py")])
    assert create_model("file_mlp", 10, 8)(torch.zeros(2, 3, 8, 8)).shape == (2, 10)


def test_non_finite_weights_are_refused_at_load_and_a_dml_student_is_named(tmp_path, capsys):
    from common.models import load_teacher

    model = create_model("resnet8", 10, 32)
    state = model.state_dict()
    torch.save({"student0": state, "student1": state, "args": {}}, tmp_path / "dml.ckpt")
    load_pretrained(create_model("resnet8", 10, 32), tmp_path / "dml.ckpt")
    assert "holds 2 students of a dml.py run; its student 0 is taken" in capsys.readouterr().out
    state = {**state, "fc.weight": torch.full_like(state["fc.weight"], float("nan"))}
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(UserError, match=r"weights .*nan.pth are NaN or infinite in 1 of .* tensors \(fc.weight"):
        load_pretrained(create_model("resnet8", 10, 32), tmp_path / "nan.pth")
    with pytest.raises(UserError, match="nan.pth are NaN or infinite"):
        load_teacher("resnet8", tmp_path / "nan.pth", 10, 32)


def test_a_model_that_cannot_be_built_or_answers_with_other_classes_is_one_line(tmp_path):
    from common.models import import_model_modules

    (tmp_path / "brokenmodels.py").write_text(
        "import torch.nn as nn\nfrom timm.models import register_model\n\n"
        "@register_model\ndef raising_net(pretrained=False, num_classes=10, **kwargs):\n"
        "    raise ValueError('constructor failed')\n\n"
        "@register_model\ndef five_class_net(pretrained=False, num_classes=10, **kwargs):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))\n")
    import_model_modules([str(tmp_path / "brokenmodels.py")])
    with pytest.raises(UserError, match="^model 'raising_net' fails at 8 px with 10 classes: ValueError: constructor"):
        create_model("raising_net", 10, 8)
    with pytest.raises(UserError, match="^model 'five_class_net' answers with 5 classes, and the data set has 10$"):
        create_model("five_class_net", 10, 8)
    with pytest.raises(UserError, match="^model 'vit_tiny_patch16_224' fails at 8 px"):  # a 16-pixel patch
        create_model("vit_tiny_patch16_224", 10, 8)
