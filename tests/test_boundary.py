"""The query boundary: masked cells stay missing, impossible values are named, memory is streamed."""

import tracemalloc

import astropy.units as u
import numpy as np
import pytest
from astropy.table import MaskedColumn, Table
from astropy.utils.masked import Masked

from stellarlm import BadValueError

from conftest import XP_G


def _stars(small_embedded, n=3):
    held = small_embedded.subset("val").subset(slice(0, n))
    return held, {name: held.column(name).astype(float) for name in XP_G}


def _teff_masked_in_row_0(kind, teff, tmp_path):
    """A teff column with unit K whose row 0 is masked, made as a user would meet it."""
    if kind == "masked_column":
        return MaskedColumn([-9999.0, *teff[1:]], unit=u.K, mask=[True] + [False] * (len(teff) - 1),
                            fill_value=-9999.0)
    if kind == "masked_quantity":
        return Masked(np.r_[-9999.0, teff[1:]] * u.K, mask=[True] + [False] * (len(teff) - 1))
    if kind == "ecsv_empty_cell":
        path = tmp_path / "stars.ecsv"
        col = MaskedColumn(teff, unit=u.K, mask=[True] + [False] * (len(teff) - 1))
        Table({"teff": col, "n": np.arange(len(teff))}).write(path)
        assert path.read_text().splitlines()[-len(teff)].startswith('"" 0')  # the empty cell
        back = Table.read(path)["teff"]
        assert back.unit == u.K and back.mask[0]
        return back
    if kind == "fits_int_tnull":
        path = tmp_path / "stars.fits"
        col = MaskedColumn(np.r_[-1, teff[1:]].astype(np.int32), unit=u.K,
                           mask=[True] + [False] * (len(teff) - 1), fill_value=-1)
        Table({"teff": col}).write(path)
        back = Table.read(path)["teff"]
        assert back.dtype.kind == "i" and back.mask[0]
        return back
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["masked_column", "masked_quantity", "ecsv_empty_cell", "fits_int_tnull"])
def test_masked_cells_with_units_stay_missing(tiny_model, small_embedded, tmp_path, kind):
    model, _ = tiny_model
    held, obs = _stars(small_embedded)
    teff = np.round(held.column("teff").astype(float))
    t = Table(obs)
    t["teff"] = _teff_masked_in_row_0(kind, teff, tmp_path)
    out = model.query(t, ["logg"])
    without = model.query({k: v[:1] for k, v in obs.items()}, ["logg"])
    with_teff = model.query({**{k: v[1:2] for k, v in obs.items()}, "teff": teff[1:2]}, ["logg"])
    assert out["logg"][0] == pytest.approx(without["logg"][0], rel=1e-5)  # row 0: as if no teff at all
    assert out["logg"][1] == pytest.approx(with_teff["logg"][0], rel=1e-5)  # row 1: its teff is used


@pytest.mark.parametrize("column, values, match", [
    ("teff", [1e30], "'teff', row 0"), ("m_h", [1e308], "'m_h', row 0"), ("teff", [5000.0, -5000.0], "'teff', row 1"),
    ("g", [99.0], "'g'"), ("g", [-np.inf], "infinite"),
])
def test_values_outside_the_physical_range_are_named(tiny_model, column, values, match):
    model, _ = tiny_model
    obs = {"xp_500": [1.0] * len(values), column: values}
    with pytest.raises(BadValueError, match=match):
        model.query(obs, ["logg"])


@pytest.mark.parametrize("err, match", [(np.inf, "infinite uncertainty"), (0.0, "not a positive"),
                                        (-1.0, "not a positive")])
def test_unusable_uncertainties_are_refused_not_replaced(tiny_model, err, match):
    model, _ = tiny_model
    with pytest.raises(BadValueError, match="'teff_err', row 0.*" + match):
        model.query({"teff": [5000.0], "teff_err": [err]}, ["logg"])
    # NaN uncertainty: the typical one; an uncertainty beside a missing value: ignored
    ok = model.query({"teff": [5000.0, np.nan], "teff_err": [np.nan, np.inf]}, ["logg"])
    assert np.isfinite(ok["logg"][0]) and np.isnan(ok["logg"][1])


@pytest.mark.parametrize("values, match", [(np.array([5000 + 1j]), "complex"), (np.array([True]), "boolean"),
                                           (np.array(["5000"]), "not numeric")])
def test_complex_boolean_and_text_columns_are_refused(tiny_model, values, match):
    model, _ = tiny_model
    with pytest.raises(BadValueError, match="'teff' is " + match):
        model.query({"teff": values}, ["logg"])


def test_an_all_nan_star_has_a_nan_embedding(tiny_model, small_embedded):
    model, _ = tiny_model
    _, obs = _stars(small_embedded, 2)
    obs = {k: np.r_[v[:1], np.nan] for k, v in obs.items()}
    vec = model.embed(obs)
    assert np.all(np.isfinite(vec[0])) and np.all(np.isnan(vec[1]))
    assert np.isnan(model.query(obs, ["teff"])["teff"][1])


def test_bad_arguments_are_named(tiny_model):
    model, _ = tiny_model
    with pytest.raises(BadValueError, match="want"):
        model.query({"teff": [5000.0]}, None)
    for bad in (0, -3, 2.5):
        with pytest.raises(BadValueError, match="batch_size"):
            model.query({"teff": [5000.0]}, ["logg"], batch_size=bad)
    with pytest.raises(BadValueError, match="n_samples"):
        model.predictive({"teff": [5000.0]}, ["logg"]).sample(-1)
    bp = rp = np.full((1, 55), 1.0)
    for g in (1e30, np.nan, 1e5):
        with pytest.raises(BadValueError, match="phot_g_mean_mag', row 0"):
            model.labels_from_xp(bp, rp, [g])


def test_query_memory_does_not_grow_with_the_stars_beyond_the_output(tiny_model, small_embedded):
    model, _ = tiny_model
    _, obs = _stars(small_embedded, 1)

    def peak(n):
        many = {k: np.repeat(v, n) for k, v in obs.items()}
        tracemalloc.start()
        out = model.query(many, ["teff"], batch_size=256)
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(out) == n
        return size

    growth = peak(6000) - peak(1500)
    # the output grows by about 100 bytes per star, 0.5 MB here; the inputs as (n, 115) matrices
    # would add several times 4500 * 115 * 8 = 4 MB
    assert growth < 1.5e6, growth


def test_logg_in_the_units_astronomers_write_it(tiny_model, small_embedded, tmp_path):
    """logg as u.Dex(x, cm / s^2), or from a FITS file whose TUNIT is 'log(cm.s**-2)', means the same
    as plain dex; log of another unit (m / s^2) would shift every value, so it is refused."""
    from astropy.io import fits

    model, _ = tiny_model
    held = small_embedded.subset("val").subset(slice(0, 5))
    g, logg = held.column("g").astype(float), held.column("logg").astype(float)
    plain = model.query({"g": g, "logg": logg}, ["teff"])
    dex = model.query(Table({"g": g * u.mag, "logg": logg * u.dex(u.cm / u.s ** 2)}), ["teff"])
    np.testing.assert_allclose(dex["teff"], plain["teff"], rtol=1e-6)
    cols = [fits.Column("g", "D", array=g, unit="mag"), fits.Column("logg", "D", array=logg, unit="log(cm.s**-2)")]
    path = tmp_path / "logg.fits"
    fits.BinTableHDU.from_columns(cols).writeto(path)
    with pytest.warns(u.UnitsWarning):
        from_file = Table.read(path)
    np.testing.assert_allclose(model.query(from_file, ["teff"])["teff"], plain["teff"], rtol=1e-6)
    with pytest.raises(BadValueError, match="logg"):
        model.query(Table({"g": g * u.mag, "logg": (logg - 2) * u.dex(u.m / u.s ** 2)}), ["teff"])
