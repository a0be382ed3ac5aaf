"""The network, training and the query API, on a tiny model and a small slice of the real data."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from stellarlm import BadValueError, DataFileError, StellarLM, UnknownTokenError, VocabularyMismatchError
from stellarlm.model import ModelConfig, StellarTransformer
from stellarlm.vocab import XP_NAMES, Vocabulary, robust_scatter
from stellarlm.training import (NormalisedData, TrainConfig, _buckets, batch_loss, latest_checkpoint, load_model,
                                parallel_backward, sample_batch, save_model, train)

from conftest import TINY, XP_G, _slice


def _observed(table, names):
    return {n: table.column(n) for n in names}


def test_tiny_model_beats_the_training_median(tiny_model, small_embedded):
    model, _ = tiny_model
    train_t = small_embedded.subset("train")
    held = small_embedded.subset("val")
    out = model.query(_observed(held, XP_G), ["teff", "logg"])
    for name in ("teff", "logg"):
        truth = held.column(name).astype(float)
        ok = np.isfinite(truth)
        # robust scatter: a few 15,000 K stars would otherwise decide the comparison
        model_scatter = robust_scatter(out[name][ok] - truth[ok])
        baseline_scatter = robust_scatter(np.nanmedian(train_t.column(name)) - truth[ok])
        assert model_scatter < 0.6 * baseline_scatter, (name, model_scatter, baseline_scatter)
        assert np.all(out[f"{name}_err"][ok] > 0)


def test_answers_do_not_depend_on_input_order_or_other_queries(tiny_model, small_embedded):
    model, _ = tiny_model
    held = small_embedded.subset("val").subset(slice(0, 50))
    obs = _observed(held, XP_G)
    a = model.query(obs, ["teff", "logg"])
    shuffled = dict(sorted(obs.items(), key=lambda kv: hash(kv[0]) % 97))
    assert list(shuffled) != list(obs)
    b = model.query(shuffled, ["logg", "teff", "m_h"])
    np.testing.assert_allclose(a["teff"], b["teff"], rtol=1e-5)
    np.testing.assert_allclose(a["logg_err"], b["logg_err"], rtol=1e-5)
    # and within a batch, padding does not leak: one star alone gives the same answer
    c = model.query({k: v[:1] for k, v in obs.items()}, ["teff"])
    assert c["teff"][0] == pytest.approx(a["teff"][0], rel=1e-5)


def test_network_is_permutation_invariant():
    torch.manual_seed(0)
    net = StellarTransformer(ModelConfig(n_vocab=50, **TINY)).eval()
    ids = torch.randint(50, (3, 12))
    vals, errs = torch.randn(3, 12), torch.rand(3, 12) + 0.1
    mask = torch.ones(3, 12, dtype=torch.bool)
    q = torch.tensor([[1, 2, 3]] * 3)
    perm = torch.randperm(12)
    before = net(ids, vals, errs, mask, q)  # the mixture: means, log-variances, log-weights
    after = net(ids[:, perm], vals[:, perm], errs[:, perm], mask, q)
    for x, y in zip(before, after):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_spectrum_stem_reads_a_set_of_named_bins():
    """The spectrum stem: answers do not depend on the order of the bins, a missing bin is not a
    bin of value 0, and a star without the spectrum gets no stem token."""
    torch.manual_seed(0)
    stem_of = [0] * 20 + [1] * 10 + [-1] * 20
    net = StellarTransformer(ModelConfig(n_vocab=50, **TINY, stem_of=stem_of, stem_tokens=2)).eval()
    assert net.stem is not None
    ids = torch.stack([torch.randperm(50)[:30] for _ in range(4)])
    vals, errs = torch.randn(4, 30), torch.rand(4, 30) + 0.1
    mask = torch.ones(4, 30, dtype=torch.bool)
    q = torch.tensor([[40, 41]] * 4)
    perm = torch.randperm(30)
    for x, y in zip(net(ids, vals, errs, mask, q), net(ids[:, perm], vals[:, perm], errs[:, perm], mask[:, perm], q)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    spectral = ids < 30
    zero = net(ids, vals.masked_fill(spectral, 0.0), errs, mask, q)[0]
    dropped = net(ids, vals, errs, mask & ~spectral, q)[0]
    assert not torch.allclose(zero, dropped)
    _, present = net.stem(ids, vals, errs, mask & ~(ids < 20))  # spectrum 0 absent, spectrum 1 there
    assert present.tolist() == [[False, False, True, True]] * 4


def test_missing_tokens_are_never_inputs_or_targets(small_embedded):
    t = _slice(small_embedded)
    data = NormalisedData.from_table(t, t.vocab)
    gen = torch.Generator().manual_seed(3)
    rows = torch.arange(len(data))[:256]
    b = sample_batch(data, rows, gen, max_targets=16, p_group=0.5)
    col = {int(i): j for j, i in enumerate(data.ids)}
    for r in range(len(rows)):
        avail = torch.isfinite(data.values[rows[r]])
        given = [col[int(i)] for i in b["ids"][r][b["mask"][r]]]
        wanted = [col[int(i)] for i in b["query_ids"][r][b["target_mask"][r]]]
        assert all(avail[j] for j in given + wanted)
        assert not set(given) & set(wanted)
        assert len(given) >= 1
    # a star missing m_h still trains on its other tokens, never on m_h
    assert torch.isnan(data.values[:, t.names.index("m_h")]).any()


def test_sampler_can_favour_the_xp_spectrum_alone(small_embedded):
    t = small_embedded.select(XP_G + ["teff", "logg", "bp", "rp"])
    data = NormalisedData.from_table(t, t.vocab)
    rows = torch.arange(len(data))[:300]
    xp_ids = set(t.vocab.ids(XP_NAMES).tolist())
    g_id = t.vocab.ids(["g"])[0]

    def xp_alone_share(**kw):
        b = sample_batch(data, rows, torch.Generator().manual_seed(4), max_targets=8, p_group=1.0, **kw)
        alone = [set(b["ids"][r][b["mask"][r]].tolist()) - {g_id} <= xp_ids for r in range(len(rows))]
        return np.mean(alone)

    # every modality subset a lone source, and that source always XP: inputs are XP (+ G) only
    assert xp_alone_share(p_alone=1.0, p_xp=1.0) == 1.0
    # uniform over the three sources (XP, labels, photometry) it is about a third
    assert 0.2 < xp_alone_share(p_alone=1.0) < 0.45


def test_a_source_given_alone_past_max_inputs_is_asked_about_the_rest(small_embedded):
    """A spectrum with more bins than max_inputs, given alone: the surplus bins are dropped, never
    asked, so the questions are about the labels (the bug that kept LAMOST -> labels untrained)."""
    lamost = [f"lamost_{i}" for i in range(200)]
    t = small_embedded.select(lamost + ["teff", "logg", "m_h"])
    data = NormalisedData.from_table(t, t.vocab)
    rows = torch.arange(len(data))[:200]
    rows = rows[torch.isfinite(data.values[rows]).all(1)]
    lamost_ids = set(t.vocab.ids(lamost).tolist())
    b = sample_batch(data, rows, torch.Generator().manual_seed(5), max_targets=8, p_group=1.0, p_alone=1.0,
                     p_xp=None, max_inputs=120)
    asked = 0
    for r in range(len(rows)):
        given = set(b["ids"][r][b["mask"][r]].tolist())
        wanted = set(b["query_ids"][r][b["target_mask"][r]].tolist())
        assert len(given) <= 120
        if given <= lamost_ids:  # the LAMOST-like spectrum alone, cut to 120 bins
            assert len(given) == 120 and not wanted & lamost_ids and wanted
            asked += 1
    assert asked > 0


def test_sampler_can_add_photometry_to_a_source_given_alone(small_embedded):
    """p_extra: of the one-source draws, a share also get the other magnitudes, each with a random
    keep rate; at 0 an XP spectrum given alone comes with G at most."""
    t = small_embedded.select(XP_G + ["bp", "rp", "j", "teff", "logg"])
    data = NormalisedData.from_table(t, t.vocab)
    rows = torch.arange(len(data))[:400]
    xp = set(t.vocab.ids(XP_NAMES).tolist())
    others = set(t.vocab.ids(["bp", "rp", "j"]).tolist())

    def with_photometry(p_extra):
        b = sample_batch(data, rows, torch.Generator().manual_seed(9), max_targets=8, p_group=1.0, p_alone=1.0,
                         p_xp=1.0, p_gap=0.0, p_extra=p_extra)
        given = [set(b["ids"][r][b["mask"][r]].tolist()) for r in range(len(rows))]
        return [len(g & others) for g in given if xp <= g]

    assert max(with_photometry(0.0)) == 0
    counts = with_photometry(1.0)
    assert 0.3 < np.mean([c > 0 for c in counts]) < 0.9 and {1, 2, 3} <= set(counts)


def test_sampler_gives_half_spectra(small_embedded):
    """Random keep rates act on the BP and RP ranges separately (users inpaint RP from BP)."""
    t = small_embedded.select(XP_G + ["teff", "logg"])
    data = NormalisedData.from_table(t, t.vocab)
    rows = torch.arange(len(data))[:300]
    b = sample_batch(data, rows, torch.Generator().manual_seed(5), max_targets=8, p_group=1.0, p_alone=0.0)
    bp, rp = set(t.vocab.ids(t.vocab.group("xp_bp")).tolist()), set(t.vocab.ids(t.vocab.group("xp_rp")).tolist())
    nb, nr = len(bp), len(rp)
    given = [set(b["ids"][r][b["mask"][r]].tolist()) for r in range(len(rows))]
    bands = [(len(g & bp), len(g & rp)) for g in given]
    assert (nb, 0) in bands and (0, nr) in bands and (nb, nr) in bands
    # a band is given whole or not at all, except where a draw gave everything or nothing and the
    # star fell back to a random token subset (about a third of them)
    whole = [n_bp in (0, nb) and n_rp in (0, nr) for n_bp, n_rp in bands]
    assert np.mean(whole) > 0.5


def test_input_noise_perturbs_inputs_by_their_errors(small_embedded):
    """input_noise k: given values move by k times their errors (and the error told grows to
    sqrt(1 + k^2) times); the subsets and the targets are those drawn without noise."""
    t = small_embedded.select(XP_G + ["teff", "logg"])
    data = NormalisedData.from_table(t, t.vocab)
    rows = torch.arange(len(data))[:300]
    plain, noisy = (sample_batch(data, rows, torch.Generator().manual_seed(6), max_targets=8, p_group=0.9,
                                 input_noise=k) for k in (0.0, 0.5))
    for key in ("ids", "mask", "query_ids", "target", "target_err", "target_mask"):
        assert torch.equal(plain[key], noisy[key]), key
    m = plain["mask"] & (plain["errors"] > 0)
    torch.testing.assert_close(noisy["errors"][m], plain["errors"][m] * np.sqrt(1.25))
    pull = ((noisy["values"] - plain["values"]) / plain["errors"])[m]
    assert abs(float(pull.std()) - 0.5) < 0.02 and abs(float(pull.mean())) < 0.02
    assert torch.equal(noisy["values"][~plain["mask"]], plain["values"][~plain["mask"]])


def test_sampler_gives_xp_spectra_with_a_gap(small_embedded):
    """p_gap = 1: every star is given its XP spectrum less one contiguous wavelength range (of
    varying start and width, up to half the bins), G half the time."""
    t = small_embedded.select(XP_G + ["teff", "logg"])
    data = NormalisedData.from_table(t, t.vocab)
    rows = torch.arange(len(data))[:200]
    b = sample_batch(data, rows, torch.Generator().manual_seed(7), max_targets=8, p_group=1.0, p_gap=1.0)
    order = {int(i): n for i, n in zip(t.vocab.ids(t.names), data.xp_order.tolist())}
    g_id, gaps = int(t.vocab.ids(["g"])[0]), []
    for r in range(len(rows)):
        given = b["ids"][r][b["mask"][r]].tolist()
        missing = sorted(set(range(len(XP_NAMES))) - {order[i] for i in given if i != g_id})
        assert missing == list(range(missing[0], missing[-1] + 1)), missing  # one contiguous range
        assert 1 <= len(missing) <= len(XP_NAMES) // 2
        gaps.append((missing[0], len(missing), g_id in given))
    assert len({s for s, _, _ in gaps}) > 20 and len({w for _, w, _ in gaps}) > 20
    assert 0.3 < np.mean([g for _, _, g in gaps]) < 0.7


def test_spectra_with_a_gap_can_ask_for_the_missing_bins(small_embedded):
    """p_gap_inpaint = 1: the questions of a spectrum with a gap are the missing bins, as many as
    there are; at 0 many of them go to the other tokens (here Teff and logg)."""
    t = small_embedded.select(XP_G + ["teff", "logg"])
    data = NormalisedData.from_table(t, t.vocab)
    rows = torch.arange(len(data))[:200]
    order = dict(zip(t.vocab.ids(t.names).tolist(), data.xp_order.tolist()))
    share = {}
    for p in (0.0, 1.0):
        b = sample_batch(data, rows, torch.Generator().manual_seed(8), max_targets=8, p_group=1.0,
                         p_gap=1.0, p_gap_inpaint=p)
        asked_xp, could = 0, 0
        for r in range(len(rows)):
            given = {order[i] for i in b["ids"][r][b["mask"][r]].tolist() if order[i] >= 0}
            q = [order[i] for i in b["query_ids"][r][b["target_mask"][r]].tolist()]
            assert not given & set(q)  # never asked about what it was given
            missing = len(XP_NAMES) - len(given)
            asked_xp, could = asked_xp + sum(o >= 0 for o in q), could + min(len(q), missing)
        share[p] = asked_xp / could
    assert share[1.0] == 1.0 and share[0.0] < 0.9, share


def test_magnitudes_can_have_their_own_nll_beta():
    """token_betas: one beta for all, or the magnitudes' own; gaussian_nll weights each target by
    its variance to its own beta."""
    from stellarlm.model import gaussian_nll
    from stellarlm.training import token_betas

    vocab = Vocabulary.default()
    assert token_betas(TrainConfig(nll_beta=0.5), vocab) == 0.5
    beta = token_betas(TrainConfig(nll_beta=0.5, nll_beta_photometry=0.0), vocab)
    ids = torch.as_tensor(vocab.ids(["teff", "g", "xp_500", "k"]))[None, :]
    assert beta[ids].tolist() == [[0.5, 0.0, 0.5, 0.0]]
    mean, logvar = torch.zeros(1, 4), torch.log(torch.full((1, 4), 0.04))
    target, err, mask = torch.full((1, 4), 0.3), torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool)
    plain = 0.5 * (np.log(0.04) + 0.09 / 0.04)
    each = [float(gaussian_nll(mean[:, [j]], logvar[:, [j]], target[:, [j]], err[:, [j]], mask[:, [j]],
                               beta[ids][:, [j]])) for j in range(4)]
    np.testing.assert_allclose(each, [plain * 0.2, plain, plain * 0.2, plain], rtol=1e-5)
    same = torch.full((1, 4), 0.5)
    assert float(gaussian_nll(mean, logvar, target, err, mask, same)) == pytest.approx(
        float(gaussian_nll(mean, logvar, target, err, mask, 0.5)))


def test_bucketed_loss_is_the_single_pass_loss(small_embedded):
    """Running a batch as sub-batches of similar length changes the cost, not the loss or its gradient."""
    t = small_embedded
    data = NormalisedData.from_table(t, t.vocab)
    cfg = ModelConfig(n_vocab=len(t.vocab), d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1,
                      patch_of=t.vocab.patches(5, 20))
    torch.manual_seed(0)
    net = StellarTransformer(cfg)
    batch = sample_batch(data, torch.arange(64), torch.Generator().manual_seed(2), max_targets=8, p_group=0.9)
    sizes = [len(part["ids"]) for part in _buckets(net, batch, 4)]
    widths = [part["ids"].shape[1] for part in _buckets(net, batch, 4)]
    assert sum(sizes) == 64 and min(widths) < batch["ids"].shape[1]
    grads = []
    for n in (1, 4):
        net.zero_grad()
        loss = batch_loss(net, batch, beta=0.5, n_buckets=n)
        loss.backward()
        grads.append((loss.item(), net.embed.weight.weight.grad.clone()))
    with ThreadPoolExecutor(2) as pool:  # the same, with the sub-batches shared by two threads
        net.zero_grad()
        loss = parallel_backward(net, batch, pool, n_workers=2, beta=0.5, n_buckets=4)
        grads.append((loss.item(), net.embed.weight.weight.grad.clone()))
    for loss, grad in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-5)
        assert torch.allclose(grad, grads[0][1], atol=1e-6)


def test_missing_inputs_are_skipped_per_star(tiny_model, small_embedded):
    model, _ = tiny_model
    held = small_embedded.subset("val").subset(slice(0, 20))
    obs = _observed(held, XP_G)
    obs["g"] = obs["g"].copy()
    obs["g"][0] = np.nan
    out = model.query(obs, ["teff"])
    without_g = model.query({k: v[:1] for k, v in obs.items() if k != "g"}, ["teff"])
    assert out["teff"][0] == pytest.approx(without_g["teff"][0], rel=1e-5)
    nothing = model.query({"g": np.array([np.nan, 12.0])}, ["teff"])
    assert np.isnan(nothing["teff"][0]) and np.isfinite(nothing["teff"][1])


def test_labels_from_archive_xp_and_truncated_spectra(tiny_model):
    """labels_from_xp takes the archive's e-/s coefficients (the real astroquery star) and answers as
    the XP_CONTINUOUS reader's tokens do; with n_relevant_bases the higher orders are not used
    (changing them changes nothing), and bad counts are refused."""
    from astropy.table import Table

    from stellarlm.data.gaia_xp import array_column, astroquery_example_files, read_xp_continuous

    model, _ = tiny_model
    path = astroquery_example_files()["XP_CONTINUOUS"]["fits"]
    t = Table.read(path)
    arr = {f"{b}_{k}": array_column(t, f"{b}_{k}", path, length=None) for b in ("bp", "rp")
           for k in ("coefficients", "coefficient_errors", "coefficient_correlations")}
    g = [13.871]
    full = model.labels_from_xp(arr.pop("bp_coefficients"), arr.pop("rp_coefficients"), g, want=["teff"], **arr)
    read = read_xp_continuous(path, g_mag=g)
    obs = read.observed(read.names)
    del obs["g_err"]  # labels_from_xp takes no G error: the typical one is assumed for both
    direct = model.query(obs, ["teff"])
    np.testing.assert_allclose(full["teff"], direct["teff"], rtol=1e-5)
    bp, rp = (array_column(t, f"{b}_coefficients", path) for b in ("bp", "rp"))
    cut = model.labels_from_xp(bp, rp, g, want=["teff"], bp_n_relevant_bases=22, rp_n_relevant_bases=12)
    noisy_bp = np.where(np.arange(55)[None, :] >= 22, 1e6, bp)
    again = model.labels_from_xp(noisy_bp, rp * np.where(np.arange(55) >= 12, -3.0, 1.0), g, want=["teff"],
                                 bp_n_relevant_bases=22, rp_n_relevant_bases=12)
    np.testing.assert_allclose(cut["teff"], again["teff"], rtol=1e-5)
    assert np.all(np.isfinite(cut["teff"]))
    for bad in (0, 56, 12.5, [30, 30]):
        with pytest.raises(BadValueError, match="bp_n_relevant_bases"):
            model.labels_from_xp(bp, rp, g, bp_n_relevant_bases=bad)
    with pytest.raises(BadValueError, match="bp_coefficients has shape"):
        model.labels_from_xp(bp[:, :54], rp, g)


def test_checkpoint_round_trip(tiny_model, small_embedded):
    model, out = tiny_model
    again = StellarLM.load(out)
    held = small_embedded.subset("val").subset(slice(0, 10))
    a = model.query(_observed(held, XP_G), ["teff"])
    b = again.query(_observed(held, XP_G), ["teff"])
    np.testing.assert_array_equal(a["teff"], b["teff"])
    assert again.vocab == model.vocab
    meta = json.loads((out / "model.json").read_text())
    assert meta["step"] == 400 and meta["vocabulary"]["tokens"][114]["name"] == "teff"


def test_models_from_before_the_value_offset_and_the_mixture_still_load(tmp_path):
    vocab = Vocabulary.default()
    old = StellarTransformer(ModelConfig(n_vocab=len(vocab), value_offset=False, n_components=1, **TINY))
    save_model(tmp_path, old, vocab, {})
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["config"]["value_offset"], meta["config"]["n_components"]  # as written before the options existed
    (tmp_path / "model.json").write_text(json.dumps(meta))
    (tmp_path / "checksums.json").unlink()  # nor were checksums written then
    loaded, _, _ = load_model(tmp_path)
    assert loaded.embed.offset is None and loaded.cfg.n_components == 1
    for a, b in zip(old.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_resumed_run_ends_with_the_same_weights(small_embedded, tmp_path):
    t = _slice(small_embedded).subset(slice(0, 600))
    def cfg(out):
        return TrainConfig(out_dir=str(out), steps=12, batch_size=16, warmup_steps=3, checkpoint_every=4,
                           eval_every=6, model=ModelConfig(**TINY), seed=7)
    train(t, cfg(tmp_path / "straight"), progress=False)
    train(t, cfg(tmp_path / "killed"), progress=False, stop_at=6)  # dies after step 6 (checkpoint there)
    train(t, cfg(tmp_path / "killed"), progress=False, resume=True)
    a, _, _ = load_model(tmp_path / "straight")
    b, _, _ = load_model(tmp_path / "killed")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    # a damaged training state is refused with a clear message
    (latest_checkpoint(tmp_path / "killed") / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(DataFileError, match="train_state.pt"):
        train(t, cfg(tmp_path / "killed"), progress=False, resume=True)


def test_bad_queries_raise_clear_errors(tiny_model, tmp_path):
    model, out = tiny_model
    with pytest.raises(UnknownTokenError, match="did you mean 'teff'"):
        model.query({"g": [12.0]}, ["tef"])
    with pytest.raises(UnknownTokenError, match="gmag"):
        model.query({"gmag": [12.0]}, ["teff"])
    with pytest.raises(BadValueError, match="infinite"):
        model.query({"g": [np.inf]}, ["teff"])
    with pytest.raises(BadValueError, match="shape"):
        model.query({"g": np.ones((2, 3))}, ["teff"])
    with pytest.raises(BadValueError, match="both given and wanted"):
        model.query({"g": [12.0], "teff": [5000.0]}, ["teff"])
    with pytest.raises(BadValueError, match="empty"):
        model.query({"g": []}, ["teff"])
    with pytest.raises(BadValueError, match="empty"):
        model.query({"g": [12.0]}, [])
    with pytest.raises(BadValueError, match="not trained on"):
        model.query({"g": [12.0]}, ["lamost_3"])  # the tiny model never saw LAMOST-like tokens
    with pytest.raises(BadValueError, match="negative"):
        model.query({"g": [12.0], "g_err": [-0.1]}, ["teff"])
    import astropy.units as u
    from astropy.table import Table
    with pytest.raises(BadValueError, match="unit"):
        model.query(Table({"g": [12.0] * u.K}), ["teff"])
    ok = model.query(Table({"teff": [5.0] * u.kK, "logg": [2.5] * u.dex}), ["g"])  # kK -> K converts
    assert np.isfinite(ok["g"][0])


def test_checkpoint_problems_are_reported(tiny_model, tmp_path):
    import shutil
    from dataclasses import replace
    from stellarlm import Vocabulary
    _, out = tiny_model
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    v = Vocabulary.default()
    swapped = Vocabulary(replace(t, name={"teff": "logg", "logg": "teff"}.get(t.name, t.name)) for t in v.tokens)
    with pytest.raises(VocabularyMismatchError, match="differs"):
        StellarLM.load(copy, vocab=swapped)
    (copy / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(DataFileError, match="model.safetensors"):
        StellarLM.load(copy)
    with pytest.raises(DataFileError, match="missing"):
        StellarLM.load(tmp_path / "nowhere")


def test_masked_cells_are_missing_not_fill_values(tiny_model, small_embedded, tmp_path):
    from astropy.table import MaskedColumn, Table
    model, _ = tiny_model
    held = small_embedded.subset("val").subset(slice(0, 3))
    t = Table({n: held.column(n).astype(float) for n in XP_G})
    t["g"] = MaskedColumn(t["g"], mask=[True, False, False])
    out = model.query(t, ["teff"])
    without_g = model.query({n: held.column(n)[:1] for n in XP_G if n != "g"}, ["teff"])
    assert out["teff"][0] == pytest.approx(without_g["teff"][0], rel=1e-5)
    # the same through a CSV file with an empty cell
    path = tmp_path / "stars.csv"
    t.write(path)
    back = Table.read(path)
    assert back["g"].mask[0]
    assert model.query(back, ["teff"])["teff"][0] == pytest.approx(without_g["teff"][0], rel=1e-5)
