import pytest
import torch

from common.data import load_dataset, make_loader
from common.landscape import compare, loss_curve
from common.losses import cross_entropy
from conftest import FakeFabric


def test_loss_curve_rises_with_noise_and_restores_the_weights():
    torch.manual_seed(0)
    data = load_dataset("cifar10-mini", train_subset=200)
    loader = make_loader({**data, "test": data["train"]}, "test", 100, FakeFabric())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():
        clean = sum(cross_entropy(model(x), y) * len(y) for x, y in loader.epoch()) / 200
    before = [p.clone() for p in model.parameters()]
    rows = loss_curve(model, loader, FakeFabric(), sigmas=(0.0, 0.5, 5.0), draws=3)
    assert [r["sigma"] for r in rows] == [0.0, 0.5, 5.0]
    assert abs(rows[0]["loss_mean"] - clean.item()) < 1e-4 and rows[0]["loss_std"] == 0
    assert rows[0]["loss_mean"] < rows[2]["loss_mean"] and rows[2]["loss_std"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # against the clean model: the rise, the rise as a share of the clean loss, the top-1 drop
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum() for x, y in loader.epoch()).item()
    assert rows[0]["top1_mean"] == pytest.approx(correct / 2) and rows[0]["top1_drop"] == 0 == rows[0]["rise"]
    for row in rows[1:]:
        assert row["rise"] == pytest.approx(row["loss_mean"] - rows[0]["loss_mean"])
        assert row["relative_rise"] == pytest.approx(row["rise"] / rows[0]["loss_mean"])
        assert row["top1_drop"] == pytest.approx(rows[0]["top1_mean"] - row["top1_mean"])


def test_compare_refuses_an_out_it_cannot_write_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    for out, message in [(tmp_path, "is a folder: give the PNG file"), (tmp_path / "afile" / "x.png", "is a file"),
                         (tmp_path / "missing" / "x.png", "does not exist")]:
        with pytest.raises(SystemExit, match=f"^error: --out .*{message}"):
            compare([tmp_path], out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]  # no thesis.tmp left
