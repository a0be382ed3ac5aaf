"""`stellarlm bench --quick`: the benchmark runs end to end in seconds, and its numbers mean something."""

import json
from pathlib import Path

import numpy as np
import pytest

from stellarlm.bench import BASELINES, INPUT_SETS, LABELS, METHODS, BenchConfig, run_benchmark, with_colours
from stellarlm.bench.metrics import binned_metrics, calibration_metrics, residual_metrics
from stellarlm.cli import main
from stellarlm.vocab import LAMOST_NAMES, XP_NAMES, robust_scatter

WITH_SIGMA = ("stellarlm", "mlp", "mlp_ensemble")


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
            assert ("calibration" in res["labels"]["teff"]) == (method in WITH_SIGMA)
            if method in BASELINES:  # the training cost, measured; nothing cached on a first run
                assert res["info"]["cpu_seconds"] >= 0 and res["info"]["wall_seconds"] >= 0
                assert res["info"]["cached"] is False
    for name in result["plots"]:
        assert (out / name).stat().st_size > 10_000, name
    assert len(result["plots"]) == len(INPUT_SETS) * (len(LABELS) + 1)
    speed = result["speed"]["cpu"]
    assert set(speed["inference_stars_per_s"]) == {"1", "64", "4096"}
    assert all(r > 0 for r in speed["inference_stars_per_s"].values())
    assert speed["training_samples_per_s"] > 0
    md = (out / "bench.md").read_text()
    assert "QUICK RUN" in md and "| XP + G | stellarlm |" in md
    for key, (description, _) in INPUT_SETS.items():
        for method in METHODS:
            assert f"| {description} | {method} |" in md or f"| {description} (" in md, (key, method)
        for method in BASELINES:  # the cost table: settings, CPU and wall seconds
            assert f"| {description} | {method} | " in md.split("**Baselines**")[1]
    assert "cosine" in md and "depth/learning rate/rounds" in md


def test_xgboost_gets_the_colours_of_neighbouring_bands():
    """Trees split on one feature at a time, so XGBoost is given colours beside the magnitudes; a
    colour with a missing magnitude is missing, and XP + G alone gets none."""
    inputs = ["g", "bp", "rp", "j", "h", "k"]
    x = np.array([[12.0, 12.4, 11.5, 10.6, 10.1, 10.0], [12.0, 12.4, 11.5, np.nan, 10.1, 10.0]])
    out = with_colours(x, inputs)
    np.testing.assert_allclose(out[0, 6:], [0.4, 0.5, 0.9, 0.5, 0.1])  # BP-G, G-RP, RP-J, J-H, H-Ks
    assert np.isnan(out[1, 8:10]).all() and np.isfinite(out[1, [6, 7, 10]]).all()
    xp_g = INPUT_SETS["xp_g"][1]
    assert with_colours(np.zeros((2, len(xp_g))), xp_g).shape == (2, len(xp_g))


def test_input_sets_colours_and_lamost(quick_bench):
    """XP + G + colours: the magnitudes (every method the same information); LAMOST-like alone:
    only the stars that have the (synthetic) spectrum, the same stars for every method."""
    result, _ = quick_bench
    assert INPUT_SETS["xp_colours"][1] == XP_NAMES + ["g", "bp", "rp", "j", "h", "k"]
    assert INPUT_SETS["lamost"][1] == LAMOST_NAMES and "synthetic" in INPUT_SETS["lamost"][0].lower()
    entry = result["input_sets"]["lamost"]
    assert 0 < entry["n"]["test"] <= result["n"]["test"]
    for res in entry["methods"].values():
        assert res["labels"]["teff"]["overall"]["n"] == entry["n"]["test"]  # every method, every star


def test_xgboost_is_tuned_on_validation(quick_bench):
    info = quick_bench[0]["input_sets"]["xp_g"]["methods"]["xgboost"]["info"]
    assert set(info["chosen"]) == set(LABELS)
    for label in LABELS:
        grid = info["grid"][label]
        assert len(grid) == len(info["max_depths"]) * len(info["learning_rates"]) >= 4
        assert info["chosen"][label]["val_rmse"] == min(p["val_rmse"] for p in grid)


def test_mlp_teff_is_learnt_in_log10_and_answered_in_kelvin(quick_bench, small_embedded):
    from stellarlm.bench.baselines import mlp_predict, torch_threads

    for method in ("mlp", "mlp_ensemble"):  # in the bench: residuals in K, not in dex of log10(K)
        res = quick_bench[0]["input_sets"]["xp_g"]["methods"][method]
        assert res["info"]["log_columns"] == [LABELS.index("teff")]
        teff = res["labels"]["teff"]
        assert 10 < teff["overall"]["robust_scatter"] < 2000 and abs(teff["overall"]["bias"]) < 1000
        assert 0.2 < teff["calibration"]["z_std"] < 5
    t = small_embedded.select(XP_NAMES + ["g", "teff"])
    x, y, e = t.values[:, :-1].astype(float), t.values[:, -1:].astype(float), t.errors[:, -1:].astype(float)
    with torch_threads(1):
        mean, sigma, info = mlp_predict(x[:800], y[:800], e[:800], x[800:1000], y[800:1000], e[800:1000],
                                        x[1000:1200], max_epochs=4, log_columns=[0])
    assert 3500 < np.median(mean) < 7000 and (mean > 2000).all() and (mean < 20000).all()  # K
    assert 10 < np.median(sigma) < 3000 and (sigma > 0).all()  # K, not dex
    assert 1 <= info["best_epoch"] <= 4 and info["schedule"] == "cosine"


def test_ensemble_combines_its_members():
    """mean = mean of the members' means; variance = mean of their variances + variance of the means,
    so the ensemble's sigma is never below the members' mean sigma."""
    from stellarlm.bench.baselines import mlp_ensemble_predict, mlp_predict, torch_threads

    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 5))
    y = np.column_stack([5000 + 400 * x[:, 0] + 50 * rng.normal(size=400), x[:, 1] + 0.3 * rng.normal(size=400)])
    y[::7, 1] = np.nan  # a missing label is masked
    e = np.full_like(y, 0.01)
    args = (x[:250], y[:250], e[:250], x[250:320], y[250:320], e[250:320], x[320:])
    with torch_threads(1):
        mean, sigma, info = mlp_ensemble_predict(*args, seed=3, members=3, max_epochs=2, hidden=32, log_columns=[0])
        members = [mlp_predict(*args, seed=3 + i, max_epochs=2, hidden=32, log_columns=[0]) for i in range(3)]
    means, sigmas = np.stack([m[0] for m in members]), np.stack([m[1] for m in members])
    assert info["seeds"] == [3, 4, 5] and info["n_members"] == 3
    np.testing.assert_allclose(mean, means.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma ** 2, (sigmas ** 2).mean(0) + means.var(0), rtol=1e-6)
    assert (sigma >= sigmas.mean(0) - 1e-9).all()
    assert np.isfinite(mean).all() and (mean[:, 0] > 1000).all()


def test_baseline_cache_is_used_and_invalidated(quick_bench, small_embedded, tmp_path):
    """A second run takes every baseline from the cache (same numbers); another seed, other input
    data or --no-baseline-cache retrain; an unreadable cache file is ignored with a warning."""
    from stellarlm.data.embedded import EMBEDDED_FILE

    first, out = quick_bench
    data_dir = str(Path(small_embedded.meta["path"]).parent)
    common = dict(quick=True, out_dir=str(tmp_path / "run"), cache_dir=data_dir,
                  baseline_cache_dir=str(out / "baseline_cache"))
    again = run_benchmark(BenchConfig(methods=BASELINES, input_sets=("lamost",), **common), log=lambda msg: None)
    for method in BASELINES:
        res, before = again["input_sets"]["lamost"]["methods"][method], first["input_sets"]["lamost"]["methods"][method]
        assert res["info"]["cached"] is True
        assert res["info"]["cpu_seconds"] == before["info"]["cpu_seconds"]  # the cost of the run that made it
        assert res["labels"]["teff"]["overall"] == before["labels"]["teff"]["overall"]
    assert "| cached |" in (tmp_path / "run" / "bench.md").read_text()

    def cached(**kw):
        cfg = {**common, "methods": ("knn",), "input_sets": ("phot",), **kw}
        result = run_benchmark(BenchConfig(**cfg), log=lambda msg: None)
        return result["input_sets"]["phot"]["methods"]["knn"]["info"]["cached"]

    assert cached() is True
    assert cached(seed=1) is False and cached(seed=1) is True
    assert cached(baseline_cache=False) is False and cached() is True  # retrained, and the cache rewritten
    changed = small_embedded.subset(np.arange(len(small_embedded)))  # a copy
    changed.values[changed.split == 0, changed.names.index("j")] += 0.01  # one input column of the training stars
    (tmp_path / "data").mkdir()
    changed.save(tmp_path / "data" / EMBEDDED_FILE)
    assert cached(cache_dir=str(tmp_path / "data")) is False

    cache = tmp_path / "own_cache"
    assert cached(baseline_cache_dir=str(cache)) is False
    (path,) = cache.glob("phot_knn_*.npz")
    path.write_bytes(b"not a cache file")
    with pytest.warns(UserWarning, match="ignored"):
        assert cached(baseline_cache_dir=str(cache)) is False
    assert cached(baseline_cache_dir=str(cache)) is True  # rewritten


def test_cached_only_runs_the_cached_baselines_and_lists_the_rest(quick_bench, small_embedded, tmp_path):
    """cached_only: a baseline with a cached result is reported, one without is not trained but
    listed as not run, in bench.json and bench.md."""
    _, out = quick_bench
    data_dir = str(Path(small_embedded.meta["path"]).parent)
    result = run_benchmark(BenchConfig(quick=True, out_dir=str(tmp_path), cache_dir=data_dir, input_sets=("phot",),
                                       methods=("knn", "mlp"), baseline_cache_dir=str(out / "baseline_cache"),
                                       cached_only=True, seed=7), log=lambda msg: None)
    entry = result["input_sets"]["phot"]
    assert entry["skipped"] == ["knn", "mlp"] and entry["methods"] == {}
    assert "| knn | not run | not run" in (tmp_path / "bench.md").read_text()
    result = run_benchmark(BenchConfig(quick=True, out_dir=str(tmp_path), cache_dir=data_dir, input_sets=("phot",),
                                       methods=("knn",), baseline_cache_dir=str(out / "baseline_cache"),
                                       cached_only=True), log=lambda msg: None)
    assert result["input_sets"]["phot"]["methods"]["knn"]["info"]["cached"] is True


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
