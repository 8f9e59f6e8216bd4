"""bench.py: every field of its report, on a short measurement."""
import bench
from common.data import load_dataset
from common.run import make_fabric


def test_bench_reports_every_field(tmp_path):
    fabric = make_fabric()
    data = load_dataset("cifar10-mini", train_subset=1280)
    result = bench.measure("takd", fabric, data, steps=2)
    assert set(result) == {"batch_size", "img_per_s", "gflop_per_img", "breakdown", "peak_memory_mb", "teacher_share"}
    assert result["img_per_s"] > 0 and 0 < result["teacher_share"] < 1
    # plain10 → plain4 at 32 px: the teacher's forward and the student's forward and backward, about 0.18 GFLOP
    assert 0.1 < result["gflop_per_img"] < 0.3
    assert abs(sum(result["breakdown"].values()) - 1) < 1e-6 and min(result["breakdown"].values()) >= 0
    assert bench.peak_gflops(fabric, size=512, repeats=2) > 0
