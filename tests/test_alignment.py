"""Alignment (one embedding space for every view), similarity search and anomaly scores on tiny models."""

import json

import numpy as np
import pytest

from stellarlm import StellarLM
from stellarlm.alignment import VIEWS, draw_view_pairs, info_nce, ranks, retrieval
from stellarlm.anomaly import DEFECTS, calibrate_anomaly, inject_defect, roc_auc
from stellarlm.errors import BadValueError, ConfigError, DataFileError
from stellarlm.model import ModelConfig
from stellarlm.similarity import EmbeddingIndex, faiss_available
from stellarlm.training import NormalisedData, TrainConfig, train, validate_config

from conftest import TINY

NAMES = [n for v in VIEWS.values() for n in v]


@pytest.fixture(scope="module")
def table(small_embedded):
    return small_embedded.select([n for n in NAMES if n in small_embedded.names])


def _train(table, out, align_weight):
    cfg = TrainConfig(out_dir=str(out), steps=150, batch_size=64, lr=3e-3, warmup_steps=20, checkpoint_every=1000,
                      eval_every=150, p_group=1.0, model=ModelConfig(**TINY, align_dim=16), seed=0,
                      align_weight=align_weight)
    train(table, cfg, progress=False)
    return StellarLM.load(out, device="cpu")


@pytest.fixture(scope="module")
def models(table, tmp_path_factory):
    """The same tiny model and budget, without and with the alignment term."""
    root = tmp_path_factory.mktemp("align")
    return _train(table, root / "plain", 0.0), _train(table, root / "aligned", 1.0)


def test_view_pairs_are_disjoint_sources_of_the_same_star(table):
    import torch
    data = NormalisedData.from_table(table.subset("train"), table.vocab)
    rows = torch.arange(64)
    pairs = draw_view_pairs(data, rows, torch.Generator().manual_seed(0))
    assert pairs["align_valid"].all()  # every star here has XP, labels and photometry
    for i in range(64):
        a = set(pairs["align_a_ids"][i][pairs["align_a_mask"][i]].tolist())
        b = set(pairs["align_b_ids"][i][pairs["align_b_mask"][i]].tolist())
        assert a and b and not a & b
        groups_b = {table.vocab[j].group for j in b}
        assert groups_b in ({"xp_bp", "xp_rp"}, {"lamost"}, {"label"}, {"photometry"})  # one whole source
    assert (info_nce(torch.eye(4), torch.eye(4), 0.1) < 0.01).item()


@pytest.mark.parametrize("workers, n_buckets", [(1, 1), (1, 4), (2, 4)])
def test_the_shared_alignment_gradient_equals_the_single_pass(models, table, workers, n_buckets):
    """alignment_backward (views cut by width, shared among threads) against one padded
    alignment_loss(...).backward(): the same loss and, added to a gradient already there, the same
    gradients."""
    import torch
    from stellarlm.alignment import alignment_loss
    from stellarlm.training import alignment_backward, worker_pool

    net = models[1].model.train()
    data = NormalisedData.from_table(table.subset("train"), table.vocab)
    batch = draw_view_pairs(data, torch.arange(48), torch.Generator().manual_seed(3))
    params = list(net.parameters())
    net.zero_grad()
    expected = alignment_loss(net, batch, 0.1)
    (0.5 * expected).backward()
    want = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    for p, w in zip(params, want):
        p.grad = w.clone()  # a gradient already there (the NLL's): the term adds to it
    with worker_pool(workers, torch.device("cpu")) as pool:
        got = alignment_backward(net, batch, 0.5, 0.1, pool, workers, n_buckets)
    got_grads = [p.grad.clone() for p in params]
    net.zero_grad(set_to_none=True)  # the fixture's model is shared with the other tests
    net.eval()
    assert torch.allclose(got, expected.detach(), rtol=1e-5)
    for g, w in zip(got_grads, want):
        assert torch.allclose(g, 2 * w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
    assert any(float(w.abs().max()) > 0 for w in want)


def test_the_alignment_term_puts_views_of_one_star_together(models, table):
    plain, aligned = models
    val = table.subset("val")
    views = ("xp", "lamost", "labels", "photometry")
    with_term = retrieval(aligned, val, views)
    without = retrieval(plain, val, views)
    n = with_term["n_stars"]
    assert n > 100
    med_with = np.array([r["median_rank"] for r in with_term["pairs"].values()])
    med_without = np.array([r["median_rank"] for r in without["pairs"].values()])
    top10_with = np.mean([r["top10"] for r in with_term["pairs"].values()])
    top10_without = np.mean([r["top10"] for r in without["pairs"].values()])
    # without the term the views do not meet (about chance, n / 2); with it, far better on every pair
    assert np.median(med_with) < 0.5 * np.median(med_without)
    assert top10_with > top10_without + 0.05
    assert np.all(med_with < n / 3)
    # the same star through XP and through its labels is closer than two different stars
    xp = aligned.embed(val.observed(VIEWS["xp"]))
    labels = aligned.embed(val.observed(VIEWS["labels"]))
    ok = np.isfinite(xp).all(1) & np.isfinite(labels).all(1)
    sim = xp[ok] @ labels[ok].T
    same, other = np.diag(sim).mean(), (sim.sum() - np.trace(sim)) / (sim.size - len(sim))
    assert same > other + 0.2
    np.testing.assert_allclose(np.linalg.norm(xp[ok], axis=1), 1.0, rtol=1e-5)
    assert ranks(xp[ok], xp[ok]).max() == 1  # each star is its own best match in one view


def test_alignment_options_are_checked():
    for bad in ({"align_weight": -1.0}, {"align_weight": float("nan")}, {"align_temperature": 0.0}):
        with pytest.raises(ConfigError, match="align"):
            validate_config(TrainConfig(**bad))
    with pytest.raises(ConfigError, match="align-dim"):
        validate_config(TrainConfig(model=ModelConfig(align_dim=-1)))


def test_the_index_finds_the_exact_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((20, 16)).astype(np.float32)
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    truth = np.argsort(-(q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T, axis=1)[:, :7]
    index = EmbeddingIndex.build(v, np.arange(500) + 1000, "a" * 64, columns={"teff": np.arange(500.0)})
    rows, sims = index.search(q, k=7)
    assert index.kind == "exact"
    np.testing.assert_array_equal(rows, truth)
    assert np.all(np.diff(sims, axis=1) <= 0)
    again = EmbeddingIndex.load(index.save(tmp_path / "i"), model_sha256="a" * 64)
    np.testing.assert_array_equal(again.search(q, k=7)[0], truth)
    np.testing.assert_array_equal(again.columns["teff"], np.arange(500.0))
    # a star of the library is not its own neighbour when excluded
    rows, _ = index.search(v[:3], k=2, exclude=index.source_id[:3])
    assert not np.any(rows == np.arange(3)[:, None])
    with pytest.raises(BadValueError, match="k must be"):
        index.search(q, k=0)
    if faiss_available():  # an IVF index scanning every cell is exact too
        ivf = EmbeddingIndex.build(v, np.arange(500), "a" * 64, kind="ivf", nlist=8)
        np.testing.assert_array_equal(ivf.search(q, k=7, nprobe=8)[0], truth)
        back = EmbeddingIndex.load(ivf.save(tmp_path / "ivf"))
        np.testing.assert_array_equal(back.search(q, k=7, nprobe=8)[0], truth)


def test_an_index_from_another_model_is_refused(models, table, tmp_path):
    from stellarlm.cli import main
    plain, aligned = models
    lib = table.subset("train").subset(slice(0, 200))
    path = aligned.build_index(lib, view="xp").save(tmp_path / "index")
    meta = json.loads((path / "index.json").read_text())
    assert meta["model_sha256"] == aligned.model_sha256 != plain.model_sha256
    assert meta["model_sha256"] == json.loads((aligned.path / "checksums.json").read_text())["files"]["model.safetensors"]
    query = lib.subset(slice(0, 2)).observed(VIEWS["labels"])
    out = aligned.similar(query, k=3, index=path)
    assert len(out) == 6 and set(out["rank"]) == {1, 2, 3}
    with pytest.raises(ConfigError, match="another model"):
        plain.similar(query, k=3, index=path)
    with pytest.raises(ConfigError, match="another model"):
        EmbeddingIndex.load(path, model_sha256=plain.model_sha256)
    assert main(["similar", "--model", str(plain.path), "--index", str(path), "--like",
                 str(lib.source_id[0])]) == 2
    # a damaged index is an error naming the file
    vectors = np.load(path / "vectors.npy")
    vectors[0, 0] += 1
    np.save(path / "vectors.npy", vectors)
    with pytest.raises(DataFileError, match="vectors.npy"):
        EmbeddingIndex.load(path)


def test_index_and_similar_commands(models, table, tmp_path, capsys):
    from stellarlm.cli import main
    _, aligned = models
    stars = table.subset("train").subset(slice(0, 120)).to_table()
    data = tmp_path / "lib.ecsv"
    stars.write(data)
    assert main(["index", "build", "--model", str(aligned.path), "--data", str(data), "--out", str(tmp_path / "i"),
                 "--view", "xp"]) == 0
    assert main(["index", "build", "--model", str(aligned.path), "--data", str(data), "--out", str(tmp_path / "i")]) == 2
    sid = str(stars["source_id"][5])
    capsys.readouterr()
    assert main(["similar", "--model", str(aligned.path), "--index", str(tmp_path / "i"), "--like", sid, "-k", "4"]) == 0
    printed = capsys.readouterr().out
    assert "similarity" in printed and sid not in printed  # the star itself is left out
    like = tmp_path / "like.ecsv"
    stars[:2][["source_id"] + [f"{n}" for n in VIEWS["labels"]]].write(like)
    out = tmp_path / "n.ecsv"
    assert main(["similar", "--model", str(aligned.path), "--index", str(tmp_path / "i"), "--like", str(like),
                 "-k", "3", "--output", str(out)]) == 0
    from astropy.table import Table
    assert len(Table.read(out)) == 6


def test_each_defect_raises_the_anomaly_score(models, table, tmp_path):
    from stellarlm.cli import main
    plain, _ = models
    cal = calibrate_anomaly(plain, table.subset("val"), max_stars=200)
    assert set(cal["sets"]) >= {"xp+lamost+labels+photometry", "xp"}
    stars = table.subset("test")
    stars = stars.subset(np.isfinite(stars.select(VIEWS["lamost"]).values).any(1))
    clean = plain.anomaly(stars.observed(stars.names), calibration=cal)
    assert np.all(np.isfinite(clean["anomaly"])) and set(clean["groups"]) == {"xp+lamost+labels+photometry"}
    assert 30 < np.median(clean["anomaly_percentile"]) < 70  # ordinary stars look ordinary
    for kind in DEFECTS:
        bad = inject_defect(stars, kind, seed=1)
        scores = plain.anomaly(bad.observed(bad.names), calibration=cal)
        auc = roc_auc(np.asarray(clean["anomaly"]), np.asarray(scores["anomaly"]))
        assert np.mean(scores["anomaly"]) > np.mean(clean["anomaly"]), (kind, auc)
        assert auc > (0.7 if kind.startswith("swapped") else 0.5), (kind, auc)
    # the command line, with the calibration stored in (a copy of) the model's model.json
    import shutil
    copy = tmp_path / "model"
    shutil.copytree(plain.path, copy)
    assert main(["anomaly", "calibrate", "--model", str(copy), "--max-stars", "10"]) == 2
    meta = json.loads((copy / "model.json").read_text())
    meta["anomaly_calibration"] = cal
    (copy / "model.json").write_text(json.dumps(meta))
    (copy / "checksums.json").unlink()
    path = tmp_path / "stars.ecsv"
    stars.subset(slice(0, 5)).to_table().write(path)
    assert main(["anomaly", "score", "--model", str(copy), "--input", str(path), "--output",
                 str(tmp_path / "scores.fits")]) == 0
    from astropy.table import Table
    got = Table.read(tmp_path / "scores.fits")
    np.testing.assert_allclose(got["anomaly"], clean["anomaly"][:5], rtol=1e-4)
    assert list(got["source_id"]) == list(stars.source_id[:5])


def test_defects_are_what_they_say(table):
    from stellarlm.vocab import xp_flux_scale
    stars = table.subset("test").subset(slice(0, 20))
    binary = inject_defect(stars, "binary", seed=0, companion_dmag=(0.0, 0.0))
    g1, g = stars.column("g").astype(float), binary.column("g").astype(float)
    assert np.all(g < g1)  # brighter than either star alone
    # two stars of equal G: the combined G is 0.753 mag brighter, the fluxes add
    np.testing.assert_allclose(g1 - g, 2.5 * np.log10(2), atol=1e-4)
    x1 = stars.column("xp_500") / xp_flux_scale(g1)
    partner = (np.arange(20) + np.random.default_rng(0).integers(1, 20, size=20)) % 20
    x2 = stars.column("xp_500")[partner] / xp_flux_scale(g1)
    np.testing.assert_allclose(binary.column("xp_500") / xp_flux_scale(g), x1 + x2, rtol=1e-4)
    swapped = inject_defect(stars, "swapped_labels_photometry", seed=0)
    assert not np.any(swapped.column("teff") == stars.column("teff"))
    np.testing.assert_array_equal(swapped.column("xp_500"), stars.column("xp_500"))
    with pytest.raises(BadValueError, match="unknown defect"):
        inject_defect(stars, "bogus")


def test_a_run_can_start_from_a_model_and_add_an_alignment_head(table, tmp_path):
    """--init-from: the shipped model's weights, a new projection head, a new optimiser (how the
    full-size alignment runs continue the shipped model)."""
    from stellarlm.training import load_model

    base_cfg = TrainConfig(out_dir=str(tmp_path / "base"), steps=20, batch_size=32, warmup_steps=5,
                           checkpoint_every=1000, eval_every=20, model=ModelConfig(**TINY), seed=0)
    train(table, base_cfg, progress=False)
    base, _, _ = load_model(tmp_path / "base")
    assert base.align_head is None
    # a learning rate so small that one step leaves the copied weights where they were
    warm_cfg = TrainConfig(out_dir=str(tmp_path / "warm"), steps=1, batch_size=32, lr=1e-9, warmup_steps=0,
                           checkpoint_every=1000, eval_every=1, model=ModelConfig(**TINY, align_dim=16), seed=1,
                           align_weight=1.0, init_from=str(tmp_path / "base"))
    train(table, warm_cfg, progress=False)
    warm, _, meta = load_model(tmp_path / "warm")
    assert meta["init_from"]["new"] == ["align_head"] and meta["init_from"]["step"] == 20
    theirs = base.state_dict()
    for name, w in warm.state_dict().items():
        if name.startswith("align_head."):
            continue
        np.testing.assert_allclose(w.numpy(), theirs[name].numpy(), atol=1e-6, err_msg=name)
    assert warm.align_head is not None
    # another architecture, or dropping a head the model has, is refused before any training
    for bad, what in ((ModelConfig(**{**TINY, "d_model": 2 * TINY["d_model"]}), "d_model"),):
        with pytest.raises(ConfigError, match=what):
            train(table, TrainConfig(out_dir=str(tmp_path / "bad"), steps=1, model=bad,
                                     init_from=str(tmp_path / "base")), progress=False)
    with pytest.raises(ConfigError, match="alignment head"):
        train(table, TrainConfig(out_dir=str(tmp_path / "bad2"), steps=1, model=ModelConfig(**TINY),
                                 init_from=str(tmp_path / "warm")), progress=False)


def test_a_run_can_start_from_a_model_and_add_a_stem_or_regroup_patches(table, tmp_path):
    """--init-from with a new spectrum stem (--stem-on, --stem-tokens) or other patches: every
    weight the source has is copied, the stem is new and starts with a zero last layer, and a stem
    the source already has cannot be changed."""
    from stellarlm.training import load_model

    base_cfg = TrainConfig(out_dir=str(tmp_path / "base"), steps=10, batch_size=32, warmup_steps=2,
                           checkpoint_every=1000, eval_every=10, model=ModelConfig(**TINY), seed=0)
    train(table, base_cfg, progress=False)
    base, _, _ = load_model(tmp_path / "base")
    warm_cfg = TrainConfig(out_dir=str(tmp_path / "warm"), steps=1, batch_size=32, lr=1e-9, warmup_steps=0,
                           checkpoint_every=1000, eval_every=1, seed=1, init_from=str(tmp_path / "base"),
                           stem_on="lamost,photometry", lamost_patch_size=5,
                           model=ModelConfig(**{**TINY, "stem_tokens": 1, "stem_hidden": 8}))
    train(table, warm_cfg, progress=False)
    warm, vocab, meta = load_model(tmp_path / "warm")
    assert meta["init_from"]["new"] == ["stem"]
    theirs = base.state_dict()
    for name, w in warm.state_dict().items():
        if not name.startswith("stem."):
            np.testing.assert_allclose(w.numpy(), theirs[name].numpy(), atol=1e-6, err_msg=name)
    assert warm.stem.n_stems == 2 and warm.cfg.stem_of[vocab["bp"].id] == 1 and warm.cfg.stem_of[vocab["xp_500"].id] == -1
    assert float(warm.stem.mlp[0][-1].weight.abs().max()) < 1e-6  # 1e-9 of a step away from zero
    assert warm.n_patches > base.n_patches  # 5-bin LAMOST patches: more of them
    with pytest.raises(ConfigError, match="stem"):
        train(table, TrainConfig(out_dir=str(tmp_path / "bad"), steps=1, init_from=str(tmp_path / "warm"),
                                 stem_on="lamost", model=ModelConfig(**{**TINY, "stem_tokens": 1, "stem_hidden": 8})),
              progress=False)
    with pytest.raises(ConfigError, match="--stem-on"):
        validate_config(TrainConfig(stem_on="lamost,spectra"))
