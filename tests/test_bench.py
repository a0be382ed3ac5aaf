"""`stellarlm bench --quick`: the benchmark runs end to end in seconds, and its numbers mean something."""

import json
from pathlib import Path

import numpy as np
import pytest

from stellarlm.bench import INPUT_SETS, LABELS, METHODS
from stellarlm.bench.metrics import binned_metrics, calibration_metrics, residual_metrics
from stellarlm.cli import main
from stellarlm.vocab import robust_scatter


@pytest.fixture(scope="module")
def quick_bench(small_embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--quick", "--cache-dir", str(Path(small_embedded.meta["path"]).parent), "--out", str(out)])
    assert rc == 0
    return json.loads((out / "bench.json").read_text()), out


def test_quick_bench_writes_every_table_and_plot(quick_bench, capsys):
    result, out = quick_bench
    assert set(result["input_sets"]) == set(INPUT_SETS)
    for entry in result["input_sets"].values():
        assert set(entry["methods"]) == set(METHODS)
        for method, res in entry["methods"].items():
            assert set(res["labels"]) == set(LABELS)
            assert ("calibration" in res["labels"]["teff"]) == (method in ("stellarlm", "mlp"))
    for name in result["plots"]:
        assert (out / name).stat().st_size > 10_000, name
    assert len(result["plots"]) == len(INPUT_SETS) * (len(LABELS) + 1)
    speed = result["speed"]["cpu"]
    assert set(speed["inference_stars_per_s"]) == {"1", "64", "4096"}
    assert all(r > 0 for r in speed["inference_stars_per_s"].values())
    assert speed["training_samples_per_s"] > 0
    md = (out / "bench.md").read_text()
    assert "QUICK RUN" in md and "| XP + G | stellarlm |" in md


def test_quick_bench_stellarlm_beats_predicting_the_median(quick_bench):
    """The shipped model, on held-out stars, from XP + G: far better than no information at all."""
    result, _ = quick_bench
    res = result["input_sets"]["xp_g"]["methods"]["stellarlm"]["labels"]
    assert res["teff"]["overall"]["robust_scatter"] < 250  # K; the test stars' own Teff spread is ~500 K
    assert res["logg"]["overall"]["robust_scatter"] < 0.5
    assert 0.5 < res["teff"]["calibration"]["z_std"] < 2.0


def test_bench_rejects_unknown_method(small_embedded, tmp_path):
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["bench", "--quick", "--methods", "randomforest", "--out", str(tmp_path)])


def test_metrics_on_known_numbers():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=20000)
    pred = truth + rng.normal(0.5, 2.0, size=20000)
    m = residual_metrics(pred, truth)
    assert abs(m["robust_scatter"] - 2.0) < 0.05 and abs(m["bias"] - 0.5) < 0.05
    assert 0.001 < m["outlier_fraction"] < 0.005  # a Gaussian has 0.27% beyond 3 sigma
    cal = calibration_metrics(pred - 0.5, np.full(20000, 2.0), truth, np.zeros(20000))
    assert abs(cal["coverage_68"] - 0.683) < 0.02 and abs(cal["coverage_95"] - 0.95) < 0.01
    bins = binned_metrics(pred, truth, truth, (-10, 0, 10))
    assert [b["n"] for b in bins] == [int((truth < 0).sum()), int((truth >= 0).sum())]
    assert robust_scatter(pred - truth) == pytest.approx(m["robust_scatter"])


def test_bench_measures_the_validation_split_when_asked(small_embedded, tmp_path):
    from stellarlm.bench import BenchConfig, run_benchmark

    cfg = BenchConfig(quick=True, out_dir=str(tmp_path), cache_dir=str(Path(small_embedded.meta["path"]).parent),
                      methods=("stellarlm", "knn"), input_sets=("phot",), batch_sizes=(64,), evaluate_on="val")
    result = run_benchmark(cfg, log=lambda msg: None)
    assert result["evaluated_on"] == "val"
    assert result["n"]["test"] == min(len(small_embedded.subset("val")), 400)
    assert (tmp_path / "bench.md").read_text().startswith("Val split")
    with pytest.raises(ValueError, match="evaluate_on"):
        run_benchmark(BenchConfig(quick=True, out_dir=str(tmp_path), evaluate_on="train"), log=lambda msg: None)
