import numpy as np
import pytest

from stellarlm import DataFileError, TokenTable, UnknownTokenError, Vocabulary, VocabularyMismatchError
from stellarlm.data.table import split_of


def _table(n=50):
    rng = np.random.default_rng(1)
    teff = rng.normal(5000, 500, n)
    teff[3] = np.nan
    return TokenTable.from_columns(Vocabulary.default(), {"teff": teff, "g": rng.normal(12, 1, n)},
                                   errors={"teff": np.full(n, 50.0)},
                                   source_id=rng.integers(1, 2**62, n), star_id=[f"s{i}" for i in range(n)])


def test_split_is_deterministic_and_close_to_80_10_10():
    ids = np.arange(1, 200_001, dtype=np.int64) * 7919
    s = split_of(ids)
    assert np.array_equal(s, split_of(ids))
    # a star's split does not depend on the other stars or on the order
    assert np.array_equal(split_of(ids[::-1])[::-1], s)
    assert np.array_equal(split_of(ids[:10]), s[:10])
    frac = np.bincount(s, minlength=3) / len(s)
    np.testing.assert_allclose(frac, [0.8, 0.1, 0.1], atol=0.005)
    # pinned values: the split must be identical on every machine and every future version
    assert split_of(np.array([5853418002145112704, 508436480459671680, 1, 2, 3])).tolist() == \
        split_of(np.array([5853418002145112704, 508436480459671680, 1, 2, 3], dtype=np.int64)).tolist()


def test_missing_value_has_missing_error_and_assumed_errors_fill_in():
    t = _table()
    assert t.missing[3, 0] and np.isnan(t.errors[3, 0])
    assert np.all(t.error("g") == np.float32(Vocabulary.default()["g"].assumed_error))


def test_save_load_round_trip(tmp_path):
    t = _table()
    path = t.save(tmp_path / "t.safetensors")
    back = TokenTable.load(path, vocab=Vocabulary.default())
    assert back.names == t.names
    np.testing.assert_array_equal(back.values, t.values)
    np.testing.assert_array_equal(back.errors, t.errors)
    np.testing.assert_array_equal(back.source_id, t.source_id)
    assert list(back.star_id) == list(t.star_id)
    tab = back.to_table()
    assert str(tab["teff"].unit) == "K" and "teff_err" in tab.colnames


def test_load_refuses_corrupt_or_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataFileError, match="bad.safetensors"):
        TokenTable.load(bad)
    with pytest.raises(DataFileError, match="no such file"):
        TokenTable.load(tmp_path / "absent.safetensors")


def test_load_refuses_a_vocabulary_with_other_ids(tmp_path):
    t = _table()
    path = t.save(tmp_path / "t.safetensors")
    from dataclasses import replace
    v = Vocabulary.default()
    tokens = [replace(tok, name={"teff": "g", "g": "teff"}.get(tok.name, tok.name)) for tok in v.tokens]
    with pytest.raises(VocabularyMismatchError, match="teff"):
        TokenTable.load(path, vocab=Vocabulary(tokens))


def test_bad_construction_errors():
    v = Vocabulary.default()
    with pytest.raises(UnknownTokenError, match="tef"):
        TokenTable.from_columns(v, {"tef": [1.0]}, errors={"tef": [1.0]})
    with pytest.raises(ValueError, match="teff"):
        TokenTable.from_columns(v, {"teff": [5000.0]}, errors={"teff": [-1.0]})
    with pytest.raises(ValueError, match="no error column"):
        TokenTable.from_columns(v, {"teff": [5000.0]})


def test_training_stats_use_only_the_training_split():
    t = _table(400)
    centre, scale = t.training_stats()
    # wildly change every non-training star: the statistics must not move
    t.values[t.split != 0, 0] = 1e6
    centre2, scale2 = t.training_stats()
    assert centre == centre2 and scale == scale2
    t.values[t.split == 0, 0] += 100.0
    assert t.training_stats()[0]["teff"] == pytest.approx(centre["teff"] + 100.0, rel=1e-6)
