import math

import numpy as np
import pytest

from stellarlm import Token, UnknownTokenError, Vocabulary, VocabularyMismatchError
from stellarlm.vocab import N_LAMOST, N_XP_BINS, default_tokens, robust_stats


def test_default_vocabulary_matches_the_builtin_token_list():
    # ids are the model's embedding rows: the shipped file must agree with the code that made it
    shipped = Vocabulary.default()
    built = default_tokens()
    assert [(t.id, t.name, t.group) for t in shipped.tokens] == [(t.id, t.name, t.group) for t in built]
    assert len(shipped.group("xp_bp")) + len(shipped.group("xp_rp")) == N_XP_BINS
    assert len(shipped.group("lamost")) == N_LAMOST
    assert all(t.synthetic for t in shipped.tokens if t.group == "lamost")
    assert all("SYNTHETIC" in t.description for t in shipped.tokens if t.group == "lamost")


def test_shipped_vocabulary_has_normalisation_statistics():
    v = Vocabulary.default()
    assert np.all(np.isfinite(v.centre)) and np.all(v.scale > 0)
    assert 4000 < v["teff"].centre < 5500  # APOGEE's red-giant-dominated sample


def test_unknown_name_suggests_close_match():
    v = Vocabulary.default()
    with pytest.raises(UnknownTokenError, match="did you mean 'teff'"):
        v["tef"]
    with pytest.raises(UnknownTokenError, match="bogus"):
        v.ids(["teff", "bogus"])


def test_extend_keeps_existing_ids():
    v = Vocabulary.default()
    new = v.extend([Token(id=-1, name="vsini", group="label", unit="km/s", description="rotation")])
    assert new["vsini"].id == len(v)
    assert [t.id for t in new.tokens[: len(v)]] == [t.id for t in v.tokens]
    with pytest.raises(VocabularyMismatchError, match="duplicate"):
        v.extend([Token(id=-1, name="teff", group="label", unit="K", description="again")])


def test_json_round_trip_keeps_nan_statistics():
    v = Vocabulary(default_tokens())
    back = Vocabulary.from_json(v.to_json())
    assert [t.name for t in back.tokens] == v.names
    assert math.isnan(back["teff"].centre)


def test_normalise_round_trip_and_missing_stats_error():
    v = Vocabulary.default()
    ids = v.ids(["teff", "logg"])
    x = np.array([[5000.0, 2.5], [6000.0, 4.4]])
    e = np.array([[50.0, 0.1], [60.0, 0.05]])
    n, ne = v.normalise(x, ids, e)
    back, be = v.denormalise(n, ids, ne)
    np.testing.assert_allclose(back, x)
    np.testing.assert_allclose(be, e)
    with pytest.raises(VocabularyMismatchError, match="teff"):
        Vocabulary(default_tokens()).normalise(x, ids)


def test_robust_stats_ignore_outliers_and_nan():
    x = np.concatenate([np.random.default_rng(0).normal(10, 2, 5000), [1e6, np.nan]])
    c, s = robust_stats(x[:, None])
    assert abs(c[0] - 10) < 0.1 and abs(s[0] - 2) < 0.1


def test_model_units_squash_heavy_tails_and_invert_exactly():
    v = Vocabulary.default()
    ids = v.ids(["lamost_150"])
    x = v["lamost_150"].centre + v["lamost_150"].scale * np.array([[0.5], [3.0], [1000.0]])
    err = np.full_like(x, 0.01 * v["lamost_150"].scale)
    y, ey = v.normalise(x, ids, err)
    assert abs(y[0, 0] - 0.5) < 0.01  # near the centre: the plain z-score
    assert y[2, 0] < 25  # a 1000-scale outlier stays a moderate number
    back, eback = v.denormalise(y, ids, ey)
    np.testing.assert_allclose(back, x, rtol=1e-10)
    np.testing.assert_allclose(eback, err, rtol=1e-10)
    # errors follow the derivative of the transform
    h = 1e-6 * v["lamost_150"].scale
    dy = (v.normalise(x + h, ids)[0] - v.normalise(x - h, ids)[0]) / (2 * h)
    np.testing.assert_allclose(ey, err * dy, rtol=1e-5)


def test_patches_group_neighbouring_spectral_tokens_only():
    vocab = Vocabulary.default()
    patch = dict(zip(vocab.names, vocab.patches(5, lamost_size=20)))
    assert patch["xp_338"] == patch["xp_362"] != patch["xp_368"]
    assert patch["xp_638"] != patch["xp_644"] == patch["xp_668"]  # the BP and RP ranges never share one
    assert patch["lamost_0"] == patch["lamost_19"] != patch["lamost_20"]
    scalars = [n for n in vocab.names if vocab[n].group not in ("xp_bp", "xp_rp", "lamost")]
    assert len({patch[n] for n in scalars}) == len(scalars)  # every scalar is its own patch
    assert len(set(patch.values())) == 11 + 13 + 10 + len(scalars)  # 51 BP-range bins, 63 RP-range ones
    assert vocab.patches(1) == list(range(len(vocab)))
    with pytest.raises(ValueError, match=">= 1"):
        vocab.patches(0)
