"""Survey file readers: Gaia XP continuous (CSV/ECSV/FITS/VOTable + astroquery download), APOGEE
allStar and LAMOST LRS. Every test writes its own small files; nothing touches the network."""

import math
import re

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from stellarlm import BadValueError, DataFileError, TokenTable
from stellarlm.data import gaia_download, gaia_xp
from stellarlm.data.apogee import read_allstar
from stellarlm.data.table import split_with_fallback
from stellarlm.data.gaia_xp import download_xp_continuous, read_xp_continuous
from stellarlm.data.lamost import (MIN_BIN_COVERAGE, bin_to_lamost_grid, lamost_bin_centres, lamost_bin_edges,
                                   read_lamost_lrs, resample_to_lamost_grid)
from stellarlm.data.xp_basis import band_needed, coefficients_to_tokens
from stellarlm.vocab import GAIA_G_ZEROPOINT, N_LAMOST, N_XP, XP_NAMES


def f_g(g):
    return 10 ** (-0.4 * (g - GAIA_G_ZEROPOINT))


def expected_xp(c, e, g, rows=slice(None)):
    """The XP tokens the readers must give: the coefficients through gaiaxpy's basis (uncorrelated:
    the test files carry no correlations)."""
    coeff = np.stack([c["bp"], c["rp"]], axis=1)[rows]
    err = np.stack([e["bp"], e["rp"]], axis=1)[rows]
    return coefficients_to_tokens(coeff, err, np.asarray(g, float)[rows])


def assert_names(exc_info, *parts):
    msg = str(exc_info.value)
    for p in parts:
        assert p in msg, f"{p!r} not in error message {msg!r}"


# ================================ Gaia XP ===========================================================
SIDS = [4295806720, 38655544960, 5853498713190525696]
G = [12.0, 15.5, 9.25]


def xp_arrays(seed=0):
    """Coefficients and errors for three stars; star 1 has no RP, star 2 has no BP."""
    rng = np.random.default_rng(seed)
    c = {b: rng.normal(0, 100, (3, N_XP)) for b in ("bp", "rp")}
    e = {b: rng.uniform(0.5, 5.0, (3, N_XP)) for b in ("bp", "rp")}
    return c, e


def xp_object_table(with_g=True, drop=()):
    """An archive-like table with variable-length (object) array columns; empty array = no band."""
    c, e = xp_arrays()
    t = Table()
    t["source_id"] = np.array(SIDS, dtype=np.int64)
    t["solution_id"] = np.full(3, 375316653866487564, dtype=np.int64)
    for b in ("bp", "rp"):
        t[f"{b}_standard_deviation"] = [1.1, 1.2, 1.3]
        for name, arr in ((f"{b}_coefficients", c[b]), (f"{b}_coefficient_errors", e[b])):
            cells = [arr[i] for i in range(3)]
            empty_row = 1 if b == "rp" else 2
            cells[empty_row] = np.array([])
            t[name] = np.array(cells, dtype=object)
    if with_g:
        t["phot_g_mean_mag"] = G
    for d in drop:
        del t[d]
    return t, c, e


def fmt_array(a, brackets="[]"):
    return brackets[0] + ", ".join(repr(float(x)) for x in a) + brackets[1]


def write_xp_csv(path, c, e, g=G, extra_header="", extra_cells=None):
    """The archive's CSV: arrays as quoted strings, '[...]' and '(...)' both, empty / null = no band."""
    lines = ["source_id,solution_id,bp_coefficients,bp_coefficient_errors,rp_coefficients,"
             "rp_coefficient_errors,phot_g_mean_mag" + extra_header]
    for i in range(3):
        br = "[]" if i != 1 else "()"
        bp_c = "" if i == 2 else f'"{fmt_array(c["bp"][i], br)}"'
        bp_e = "null" if i == 2 else f'"{fmt_array(e["bp"][i], br)}"'
        rp_c = "" if i == 1 else f'"{fmt_array(c["rp"][i], br)}"'
        rp_e = "" if i == 1 else f'"{fmt_array(e["rp"][i], br)}"'
        row = f"{SIDS[i]},375316653866487564,{bp_c},{bp_e},{rp_c},{rp_e},{g[i]}"
        if extra_cells:
            row += "," + extra_cells[i]
        lines.append(row)
    path.write_text("\n".join(lines) + "\n")
    return path


def check_xp(t: TokenTable, c, e, g=G):
    assert isinstance(t, TokenTable) and len(t) == 3
    assert t.source_id.tolist() == SIDS
    assert t.star_id[0] == f"Gaia DR3 {SIDS[0]}"
    v = t.select(XP_NAMES)
    needs_bp, needs_rp = band_needed()
    # star 0: both bands, through the basis and scaled to G = 15
    want_v, want_e = expected_xp(c, e, g, slice(0, 1))
    np.testing.assert_allclose(v.values[:1], want_v, rtol=1e-5)
    np.testing.assert_allclose(v.errors[:1], want_e, rtol=1e-5)
    # star 1: RP missing, BP present: the BP-only bins are there, the rest missing
    c1 = {"bp": c["bp"], "rp": np.where(np.arange(3)[:, None] == 1, np.nan, c["rp"])}
    want_v, want_e = expected_xp(c1, e, g, slice(1, 2))
    np.testing.assert_allclose(v.values[1][~needs_rp], want_v[0][~needs_rp], rtol=1e-5)
    assert np.isnan(v.values[1][needs_rp]).all() and np.isnan(v.errors[1][needs_rp]).all()
    # star 2: BP missing, RP present
    assert np.isnan(v.values[2][needs_bp]).all() and np.isfinite(v.values[2][~needs_bp]).all()
    np.testing.assert_allclose(t.column("g"), g, rtol=1e-6)
    assert t.meta["missing"] == {"bp_band": 1, "rp_band": 1, "both_bands": 0}


def test_xp_csv_with_string_arrays_in_both_bracket_styles(tmp_path):
    c, e = xp_arrays()
    path = write_xp_csv(tmp_path / "XP_CONTINUOUS_COMBINED.csv", c, e)
    path.write_text("# Gaia DR3 XP_CONTINUOUS, written by the archive\n" + path.read_text())
    t = read_xp_continuous(path)
    check_xp(t, c, e)
    assert t.meta["g_source"]["phot_g_mean_mag"] == 3
    # no magnitude error in the file: the vocabulary's assumed G error
    np.testing.assert_allclose(t.error("g"), t.vocab["g"].assumed_error)


@pytest.mark.parametrize("ext", ["ecsv", "fits", "xml"])
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-length", "variable-length"])
def test_xp_ecsv_fits_votable(tmp_path, ext, fixed):
    t, c, e = xp_object_table()
    if fixed:  # 2-D columns, a missing band as a row of NaN (how astropy/the archive writes fixed arrays)
        for name in [n for n in t.colnames if "coefficient" in n]:
            t[name] = gaia_xp.array_column(t, name, "x")
    path = tmp_path / f"xp.{ext}"
    t.write(path, format={"ecsv": "ascii.ecsv", "fits": "fits", "xml": "votable"}[ext])
    check_xp(read_xp_continuous(path), c, e)


def test_xp_ecsv_fixed_arrays_with_null_cells(tmp_path):
    # ECSV 'float64[55]' columns whose missing bands are written null / "" (astropy itself cannot
    # convert those; the reader falls back to reading the arrays as text)
    t, c, e = xp_object_table()
    for name in [n for n in t.colnames if "coefficient" in n]:
        t[name] = gaia_xp.array_column(t, name, "x")
    t.write(tmp_path / "xp.ecsv")
    text = (tmp_path / "xp.ecsv").read_text()
    nan_row = re.compile(r"\[NaN(,NaN)*\]")
    assert len(nan_row.findall(text)) == 4
    text = nan_row.sub("null", text, count=2)
    (tmp_path / "xp.ecsv").write_text(nan_row.sub('""', text))
    check_xp(read_xp_continuous(tmp_path / "xp.ecsv"), c, e)


def test_xp_votable_with_nulls_in_fixed_arrays(tmp_path):
    # archive VOTable: arraysize="55" with empty <TD/> cells for a missing band (masked in astropy)
    c, e = xp_arrays()
    fields = "".join(f'<FIELD name="{n}" datatype="double" arraysize="55"/>' for n in
                     ("bp_coefficients", "bp_coefficient_errors", "rp_coefficients", "rp_coefficient_errors"))
    rows = []
    for i in range(3):
        cells = []
        for b in ("bp", "rp"):
            gone = (b == "rp" and i == 1) or (b == "bp" and i == 2)
            cells += ["<TD/>" if gone else "<TD>" + " ".join(repr(float(x)) for x in arr[b][i]) + "</TD>"
                      for arr in (c, e)]
        rows.append(f"<TR><TD>{SIDS[i]}</TD>{''.join(cells)}<TD>{G[i]}</TD></TR>")
    (tmp_path / "xp.vot").write_text(
        '<?xml version="1.0"?><VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3"><RESOURCE>'
        f'<TABLE><FIELD name="source_id" datatype="long"/>{fields}<FIELD name="phot_g_mean_mag" '
        f'datatype="float"/><DATA><TABLEDATA>{"".join(rows)}</TABLEDATA></DATA></TABLE></RESOURCE></VOTABLE>')
    check_xp(read_xp_continuous(tmp_path / "xp.vot"), c, e)


def test_xp_g_from_flux_column_with_error(tmp_path):
    t, c, e = xp_object_table(with_g=False)
    flux = f_g(np.array(G))
    t["phot_g_mean_flux"] = flux
    t["phot_g_mean_flux_error"] = flux * 0.01
    t.write(tmp_path / "xp.fits")
    out = read_xp_continuous(tmp_path / "xp.fits")
    check_xp(out, c, e)
    assert out.meta["g_source"]["phot_g_mean_flux"] == 3
    expected = math.hypot(2.5 / math.log(10) * 0.01, gaia_xp.GAIA_G_ZEROPOINT_ERROR)
    np.testing.assert_allclose(out.error("g"), expected, rtol=1e-5)


def test_xp_g_magnitude_error_column_is_used(tmp_path):
    t, c, e = xp_object_table()
    t["phot_g_mean_mag_error"] = [0.01, 0.02, 0.03]
    t.write(tmp_path / "xp.fits")
    np.testing.assert_allclose(read_xp_continuous(tmp_path / "xp.fits").error("g"), [0.01, 0.02, 0.03], rtol=1e-6)


def test_xp_g_from_argument_array_and_dict(tmp_path):
    t, c, e = xp_object_table(with_g=False)
    t.write(tmp_path / "xp.ecsv")
    check_xp(read_xp_continuous(tmp_path / "xp.ecsv", g_mag=np.array(G)), c, e)
    by_id = dict(zip(SIDS, G))
    out = read_xp_continuous(tmp_path / "xp.ecsv", g_mag=by_id)
    check_xp(out, c, e)
    assert out.meta["g_source"]["g_mag argument"] == 3
    # a star missing from the dict keeps its row, with its XP tokens missing (never unscaled)
    del by_id[SIDS[0]]
    with pytest.warns(UserWarning, match="no G magnitude"):
        out = read_xp_continuous(tmp_path / "xp.ecsv", g_mag=by_id)
    assert out.missing[0].all() and not out.missing[1].all()
    assert out.meta["blanked"]["xp_no_g_magnitude"] == 1
    with pytest.raises(BadValueError, match="g_mag has 2 values"):
        read_xp_continuous(tmp_path / "xp.ecsv", g_mag=[12.0, 13.0])


def test_xp_without_any_g_names_phot_g_mean_mag(tmp_path):
    t, _, _ = xp_object_table(with_g=False)
    t.write(tmp_path / "nog.fits")
    with pytest.raises(DataFileError) as ei:
        read_xp_continuous(tmp_path / "nog.fits")
    assert_names(ei, "nog.fits", "phot_g_mean_mag")


def test_xp_star_without_both_bands_is_kept_and_counted(tmp_path):
    t, c, e = xp_object_table()
    for name in ("rp_coefficients", "rp_coefficient_errors"):
        t[name][2] = np.array([])  # star 2 had no BP already
    t.write(tmp_path / "xp.fits")
    out = read_xp_continuous(tmp_path / "xp.fits")
    assert len(out) == 3 and out.select(XP_NAMES).missing[2].all()
    assert out.meta["missing"]["both_bands"] == 1
    assert np.isfinite(out.column("g")[2])


@pytest.mark.parametrize("column", gaia_xp.REQUIRED_COLUMNS)
def test_xp_missing_required_column(tmp_path, column):
    t, _, _ = xp_object_table(drop=[column])
    t.write(tmp_path / "short.fits")
    with pytest.raises(DataFileError) as ei:
        read_xp_continuous(tmp_path / "short.fits")
    assert_names(ei, "short.fits", column)


def test_xp_wrong_array_length(tmp_path):
    c, e = xp_arrays()
    c["rp"] = c["rp"].copy()
    path = write_xp_csv(tmp_path / "len.csv", c, e)
    text = path.read_text().replace(fmt_array(c["rp"][0]), fmt_array(c["rp"][0][:54]))
    path.write_text(text)
    with pytest.raises(DataFileError) as ei:
        read_xp_continuous(path)
    assert_names(ei, "len.csv", "rp_coefficients", "54")
    # the same for a fixed-width FITS column
    t = Table({"source_id": [1], "bp_coefficients": np.ones((1, 50)), "bp_coefficient_errors": np.ones((1, 50)),
               "rp_coefficients": np.ones((1, 55)), "rp_coefficient_errors": np.ones((1, 55)),
               "phot_g_mean_mag": [12.0]})
    t.write(tmp_path / "len.fits")
    with pytest.raises(DataFileError) as ei:
        read_xp_continuous(tmp_path / "len.fits")
    assert_names(ei, "len.fits", "bp_coefficients", "50")


def test_xp_truncated_to_the_relevant_bases(tmp_path):
    """truncate=True uses each band's first n_relevant_bases coefficients (the rest set to zero, as
    GaiaXPy does); a star without the band needs no count (null)."""
    c, e = xp_arrays()
    cells = ["20,31", "12,null", "null,55"]  # star 1 has no RP, star 2 no BP
    path = write_xp_csv(tmp_path / "trunc.csv", c, e, extra_header=",bp_n_relevant_bases,rp_n_relevant_bases",
                        extra_cells=cells)
    full = read_xp_continuous(path)
    check_xp(full, c, e)
    cut = read_xp_continuous(path, truncate=True)
    v = cut.select(XP_NAMES).values
    for star, n_bp, n_rp in ((0, 20, 31), (1, 12, 55), (2, 55, 55)):
        cc = {b: c[b].copy() for b in c}
        cc["bp"][star, n_bp:] = 0.0
        cc["rp"][star, n_rp:] = 0.0
        want, _ = expected_xp(cc, e, G, slice(star, star + 1))
        ok = np.isfinite(v[star])
        np.testing.assert_allclose(v[star][ok], want[0][ok], rtol=1e-5)
    np.testing.assert_array_equal(cut.select(XP_NAMES).errors, full.select(XP_NAMES).errors)
    assert cut.meta["truncated_to_n_relevant_bases"] and not full.meta["truncated_to_n_relevant_bases"]
    # a count outside 1-55 for a present band, or no count column at all, is an error naming it
    bad = write_xp_csv(tmp_path / "bad.csv", c, e, extra_header=",bp_n_relevant_bases,rp_n_relevant_bases",
                       extra_cells=["20,31", "0,null", "null,55"])
    with pytest.raises(DataFileError) as ei:
        read_xp_continuous(bad, truncate=True)
    assert_names(ei, "bad.csv", "bp_n_relevant_bases", "row 1")
    with pytest.raises(DataFileError) as ei:
        read_xp_continuous(write_xp_csv(tmp_path / "none.csv", c, e), truncate=True)
    assert_names(ei, "none.csv", "bp_n_relevant_bases")


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan])
def test_xp_zero_negative_or_missing_error(tmp_path, bad):
    t, _, _ = xp_object_table()
    errs = t["rp_coefficient_errors"][0].copy()
    errs[7] = bad
    t["rp_coefficient_errors"][0] = errs
    t.write(tmp_path / "err.fits")
    with pytest.raises(DataFileError) as ei:
        read_xp_continuous(tmp_path / "err.fits")
    assert_names(ei, "err.fits", "rp_coefficient_errors", "coefficient 7")


def test_xp_unreadable_files(tmp_path):
    (tmp_path / "garbage.fits").write_bytes(b"\x00\x01not a fits file" * 100)
    with pytest.raises(DataFileError) as ei:
        read_xp_continuous(tmp_path / "garbage.fits")
    assert_names(ei, "garbage.fits")
    (tmp_path / "garbage.xml").write_text("<VOTABLE><broken")
    with pytest.raises(DataFileError, match="garbage.xml"):
        read_xp_continuous(tmp_path / "garbage.xml")
    with pytest.raises(DataFileError, match="unknown file type"):
        read_xp_continuous(tmp_path / "xp.parquet")
    with pytest.raises(DataFileError, match="no such file"):
        read_xp_continuous(tmp_path / "absent.csv")
    c, e = xp_arrays()
    path = write_xp_csv(tmp_path / "text.csv", c, e)
    path.write_text(path.read_text().replace(fmt_array(c["bp"][0]), "[1.0, oops]"))
    with pytest.raises(DataFileError) as ei:
        read_xp_continuous(path)
    assert_names(ei, "text.csv", "bp_coefficients", "row 0")


# --- download through astroquery, offline -----------------------------------------------------------
class FakeJob:
    def __init__(self, table):
        self.table = table

    def get_results(self):
        return self.table


@pytest.fixture
def fake_gaia(monkeypatch, tmp_path):
    """Monkeypatch astroquery's Gaia so load_data / launch_job answer from tables built here."""
    from astroquery.gaia import Gaia

    c, e = xp_arrays()
    calls = {"load_data": [], "launch_job": []}
    mode = {"format": "csv"}

    def load_data(ids, **kw):
        calls["load_data"].append((list(ids), kw))
        rows = [SIDS.index(int(i)) for i in ids]
        csv = write_xp_csv(tmp_path / "dl.csv", c, e)
        # what astroquery 0.4.11 returns: {file name: [tables]}; the CSV is read with ascii.csv
        full = Table.read(csv, format="ascii.csv", fast_reader=False)
        full.remove_column("phot_g_mean_mag")  # the DataLink product itself has no photometry
        part = full[rows]
        if mode["format"] == "votable":
            from astropy.io.votable import from_table

            t, _, _ = xp_object_table(with_g=False)
            return {"XP_CONTINUOUS_COMBINED.xml": [from_table(t[rows]).get_first_table()]}
        return {"XP_CONTINUOUS_COMBINED.csv": [part]}

    def launch_job(query, **kw):
        calls["launch_job"].append(query)
        ids = [int(s) for s in re.search(r"IN \(([^)]*)\)", query).group(1).split(",")]
        res = Table()
        res["SOURCE_ID"] = np.array(ids, dtype=np.int64)  # the archive answers in upper case
        res["phot_g_mean_mag"] = [G[SIDS.index(i)] for i in ids]
        res["phot_g_mean_flux"] = [f_g(G[SIDS.index(i)]) for i in ids]
        res["phot_g_mean_flux_error"] = [f_g(G[SIDS.index(i)]) * 0.001 for i in ids]
        return FakeJob(res)

    monkeypatch.setattr(Gaia, "load_data", load_data)
    monkeypatch.setattr(Gaia, "launch_job", launch_job)
    return calls, mode, c, e


@pytest.mark.parametrize("ext", ["csv", "ecsv", "fits", "xml"])
def test_download_xp_continuous_offline(tmp_path, fake_gaia, monkeypatch, ext):
    calls, mode, c, e = fake_gaia
    monkeypatch.setattr(gaia_download, "DATALINK_MAX_IDS", 2)  # 3 ids -> two DataLink requests
    out = download_xp_continuous(SIDS + [SIDS[0]], tmp_path / f"out.{ext}")
    assert out.exists()
    assert [ids for ids, _ in calls["load_data"]] == [SIDS[:2], SIDS[2:]]
    kw = calls["load_data"][0][1]
    assert kw["retrieval_type"] == "XP_CONTINUOUS" and kw["data_structure"] == "COMBINED"
    assert kw["data_release"] == "Gaia DR3" and kw["format"] == "csv"
    assert "gaiadr3.gaia_source" in calls["launch_job"][0] and "phot_g_mean_mag" in calls["launch_job"][0]
    t = read_xp_continuous(out)
    check_xp(t, c, e)
    # G errors from the flux errors (0.1 %) and the zero-point error
    np.testing.assert_allclose(t.error("g"), math.hypot(2.5 / math.log(10) * 0.001, gaia_xp.GAIA_G_ZEROPOINT_ERROR),
                               rtol=1e-4)
    with pytest.raises(DataFileError, match="already exists"):
        download_xp_continuous(SIDS, out)


def test_download_xp_continuous_votable_transport(tmp_path, fake_gaia):
    calls, mode, c, e = fake_gaia
    mode["format"] = "votable"
    out = download_xp_continuous(SIDS, tmp_path / "out.fits", transport_format="votable")
    check_xp(read_xp_continuous(out), c, e)


def test_download_xp_continuous_nothing_returned(tmp_path, monkeypatch):
    from astroquery.gaia import Gaia

    monkeypatch.setattr(Gaia, "load_data", lambda ids, **kw: {})
    monkeypatch.setattr(Gaia, "launch_job", lambda *a, **k: pytest.fail("no query expected"))
    with pytest.raises(DataFileError, match="no XP continuous spectra"):
        download_xp_continuous([1, 2], tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


# ================================ APOGEE allStar ====================================================
def write_allstar(path, drop=(), n=8, phot=True):
    """A small allStar-like FITS: row 1 STAR_BAD, row 2 TEFF=-9999, row 3 LOGG_ERR=0, row 4 M_H NaN,
    row 5 no Gaia id and J=99.999 and J_ERR missing, row 6 AK_TARG=-50."""
    rng = np.random.default_rng(3)
    cols = {
        "APOGEE_ID": np.array([f"2M0000000{i}+0000000" for i in range(n)]),
        "GAIAEDR3_SOURCE_ID": np.arange(1, n + 1, dtype=np.int64) * 1000003,
        "TEFF": rng.uniform(4000, 6000, n), "TEFF_ERR": np.full(n, 50.0),
        "LOGG": rng.uniform(1, 4.5, n), "LOGG_ERR": np.full(n, 0.05),
        "M_H": rng.uniform(-1, 0.3, n), "M_H_ERR": np.full(n, 0.01),
        "ALPHA_M": rng.uniform(0, 0.3, n), "ALPHA_M_ERR": np.full(n, 0.02),
        "J": rng.uniform(8, 12, n), "J_ERR": np.full(n, 0.02), "H": rng.uniform(8, 12, n),
        "H_ERR": np.full(n, 0.02), "K": rng.uniform(8, 12, n), "K_ERR": np.full(n, 0.02),
        "AK_TARG": rng.uniform(0, 0.5, n), "GAIAEDR3_PHOT_G_MEAN_MAG": rng.uniform(10, 14, n),
        "GAIAEDR3_PHOT_BP_MEAN_MAG": rng.uniform(10, 14, n), "GAIAEDR3_PHOT_RP_MEAN_MAG": rng.uniform(10, 14, n),
        "ASPCAPFLAG": np.zeros(n, dtype=np.int64),
    }
    cols["ASPCAPFLAG"][1] = (1 << 23) | (1 << 3)
    cols["TEFF"][2] = -9999.0
    cols["LOGG_ERR"][3] = 0.0
    cols["M_H"][4] = np.nan
    cols["GAIAEDR3_SOURCE_ID"][5] = 0
    cols["J"][5], cols["J_ERR"][5] = 99.999, -9999.0
    cols["H_ERR"][0] = np.nan  # H present without an error (an upper limit)
    cols["AK_TARG"][6] = -50.0
    if not phot:
        drop = tuple(drop) + ("J", "J_ERR", "H", "H_ERR", "K", "K_ERR", "GAIAEDR3_PHOT_G_MEAN_MAG",
                              "GAIAEDR3_PHOT_BP_MEAN_MAG", "GAIAEDR3_PHOT_RP_MEAN_MAG", "AK_TARG")
    t = Table({k: v for k, v in cols.items() if k not in drop})
    t.write(path, format="fits")
    return cols


def test_allstar_values_flags_and_sentinels(tmp_path):
    cols = write_allstar(tmp_path / "allStar.fits")
    t = read_allstar(tmp_path / "allStar.fits")
    assert len(t) == 8
    assert t.star_id[0] == "2M00000000+0000000"
    assert t.source_id[5] == -1 and t.source_id[0] == 1000003
    np.testing.assert_allclose(t.column("teff")[0], cols["TEFF"][0], rtol=1e-6)
    np.testing.assert_allclose(t.error("alpha_m")[7], 0.02, rtol=1e-6)
    # STAR_BAD blanks all four labels of star 1, nothing else of it
    assert all(np.isnan(t.column(n)[1]) for n in ("teff", "logg", "m_h", "alpha_m"))
    assert np.isfinite(t.column("j")[1]) and np.isfinite(t.column("g")[1])
    assert np.isnan(t.column("teff")[2]) and np.isfinite(t.column("logg")[2])
    assert np.isnan(t.column("logg")[3]) and np.isnan(t.error("logg")[3])
    assert np.isnan(t.column("m_h")[4])
    assert np.isnan(t.column("j")[5]) and np.isnan(t.column("h")[0])
    assert np.isnan(t.column("a_k")[6]) and np.isfinite(t.column("a_k")[0])
    np.testing.assert_allclose(t.error("g"), t.vocab["g"].assumed_error)
    b = t.meta["blanked"]
    assert b["teff"] == {"missing_in_file": 1, "star_bad": 1, "bad_error": 0}
    assert b["logg"] == {"missing_in_file": 0, "star_bad": 1, "bad_error": 1}
    assert b["m_h"]["missing_in_file"] == 1
    assert b["j"]["implausible_magnitude"] == 1 and b["h"]["no_valid_error"] == 1
    assert b["a_k"]["outside_valid_range"] == 1
    assert t.meta["star_bad"] == 1 and t.meta["no_gaia_source_id"] == 1
    # every present value has its error (TokenTable's own invariant)
    assert np.all(np.isfinite(t.errors[~t.missing]))


def test_allstar_without_photometry_columns(tmp_path):
    write_allstar(tmp_path / "labels_only.fits", phot=False)
    t = read_allstar(tmp_path / "labels_only.fits")
    assert t.names == ["teff", "logg", "m_h", "alpha_m"]
    assert "J" in t.meta["absent_columns"]


@pytest.mark.parametrize("column", ["LOGG_ERR", "ALPHA_M", "ASPCAPFLAG", "APOGEE_ID"])
def test_allstar_missing_required_column(tmp_path, column):
    write_allstar(tmp_path / "allStar-cut.fits", drop=[column])
    with pytest.raises(DataFileError) as ei:
        read_allstar(tmp_path / "allStar-cut.fits")
    assert_names(ei, "allStar-cut.fits", column)


def test_allstar_unreadable_and_wrong_hdu(tmp_path):
    (tmp_path / "corrupt.fits").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataFileError) as ei:
        read_allstar(tmp_path / "corrupt.fits")
    assert_names(ei, "corrupt.fits")
    write_allstar(tmp_path / "ok.fits")
    with pytest.raises(DataFileError, match="ok.fits.*no HDU 5"):
        read_allstar(tmp_path / "ok.fits", hdu=5)
    with pytest.raises(DataFileError, match="not a binary table"):
        read_allstar(tmp_path / "ok.fits", hdu=0)


def test_split_fallback_spreads_stars_without_gaia_id():
    star_id = np.array([f"2M{i:08d}+0000000" for i in range(3000)], dtype=object)
    split = split_with_fallback(np.full(3000, -1), star_id)
    frac = np.bincount(split, minlength=3) / 3000
    np.testing.assert_allclose(frac, [0.8, 0.1, 0.1], atol=0.03)
    assert np.array_equal(split, split_with_fallback(np.full(3000, -1), star_id))


# ================================ LAMOST LRS ========================================================
def lamost_pixels(npix=3909):
    # LAMOST LRS: log-linear vacuum wavelengths, 1e-4 dex steps from 3690 A
    return 10 ** (np.log10(3690.0) + 1e-4 * np.arange(npix))


def write_lrs_old(path, wave, flux, ivar, andmask=None, header=None):
    andmask = np.zeros_like(wave) if andmask is None else andmask
    image = np.vstack([flux, ivar, wave, andmask, np.zeros_like(wave)]).astype(np.float32)
    hdu = fits.PrimaryHDU(image)
    for k, v in (header or {}).items():
        hdu.header[k] = v
    hdu.writeto(path)
    return path


def write_lrs_new(path, wave, flux, ivar, andmask=None, header=None, drop=()):
    andmask = np.zeros(wave.size, np.int32) if andmask is None else andmask
    cols = [fits.Column(name=n, format=f"{wave.size}{f}", array=a[None, :])
            for n, f, a in (("FLUX", "E", flux), ("IVAR", "E", ivar), ("WAVELENGTH", "E", wave),
                            ("ANDMASK", "J", andmask), ("ORMASK", "J", np.zeros(wave.size, np.int32)))
            if n not in drop]
    primary = fits.PrimaryHDU()
    for k, v in (header or {}).items():
        primary.header[k] = v
    fits.HDUList([primary, fits.BinTableHDU.from_columns(cols, name="COADD")]).writeto(path)
    return path


def test_resample_conserves_a_flat_spectrum_and_weights_by_ivar():
    wave = lamost_pixels()
    ivar = np.where(wave < 5000, 1.0, 16.0)  # noisier in the blue
    v, e = resample_to_lamost_grid(wave, np.full(wave.size, 7.5), ivar)
    assert v.shape == e.shape == (N_LAMOST,)
    np.testing.assert_allclose(v, 7.5)
    centres = lamost_bin_centres()
    blue, red = centres < 4900, centres > 5100
    assert e[blue].min() > 3 * e[red].max()  # smaller ivar -> bigger errors
    # error = 1/sqrt(sum ivar) of the pixels in the bin
    edges = lamost_bin_edges()
    in_bin = (wave >= edges[150]) & (wave < edges[151])
    np.testing.assert_allclose(e[150], 1 / np.sqrt(ivar[in_bin].sum()))
    # weighted mean: pixels alternate flux 1 (ivar 1) and 2 (ivar 3): the 3x ivar pulls 3x harder
    flux, ivar = np.where(np.arange(wave.size) % 2, 2.0, 1.0), np.where(np.arange(wave.size) % 2, 3.0, 1.0)
    v2, e2 = resample_to_lamost_grid(wave, flux, ivar)
    w_sum, wf_sum = ivar[in_bin].sum(), (ivar * flux)[in_bin].sum()
    assert v2[150] == pytest.approx(wf_sum / w_sum) and e2[150] == pytest.approx(1 / np.sqrt(w_sum))
    assert np.all(np.abs(v2 - 1.75) < 0.05)
    with pytest.raises(BadValueError):
        resample_to_lamost_grid([2.0, 1.0], [1.0, 1.0], [1.0, 1.0])


@pytest.mark.parametrize("layout", ["old", "new"])
def test_lamost_reader_both_layouts(tmp_path, layout):
    wave = lamost_pixels()
    flux = np.full(wave.size, 250.0)
    ivar = np.full(wave.size, 0.04)
    andmask = np.zeros(wave.size, np.int32)
    # bad pixels (8 of the 19 in bin 51: under half a bin), masked by andmask or by ivar = 0: they
    # must not show, and the bin keeps enough usable pixels to stay
    flux[1000:1008] = 1e6
    andmask[1000:1004] = 4
    ivar[1004:1008] = 0.0
    header = {"OBSID": 123456, "DESIG": "J001122.33+445566.7", "HIERARCH GAIA_SOURCE_ID": 5853498713190525696}
    write = write_lrs_old if layout == "old" else write_lrs_new
    t = read_lamost_lrs(write(tmp_path / f"spec-{layout}.fits", wave, flux, ivar, andmask, header))
    assert t.names == [f"lamost_{i}" for i in range(N_LAMOST)]
    assert t.source_id[0] == 5853498713190525696 and t.star_id[0] == "LAMOST J001122.33+445566.7"
    np.testing.assert_allclose(t.values[0], 1.0, rtol=1e-6)  # flat -> 1 after dividing by the median
    # errors divided by the same median: sigma = 1/sqrt(n * 0.04) / 250
    edges = lamost_bin_edges()
    n_pix = ((wave >= edges[100]) & (wave < edges[101])).sum()
    np.testing.assert_allclose(t.errors[0, 100], 1 / np.sqrt(n_pix * 0.04) / 250.0, rtol=1e-5)
    assert t.meta["median_flux"] == [pytest.approx(250.0)]


def test_lamost_reader_list_of_files_and_missing_bins(tmp_path):
    wave = lamost_pixels()
    # a red-only spectrum: blue bins have no pixels at all -> missing, not zero
    red = wave > 6000
    a = write_lrs_old(tmp_path / "a.fits", wave, np.full(wave.size, 2.0), np.where(red, 1.0, 0.0))
    b = write_lrs_new(tmp_path / "b.fits", wave, np.linspace(1, 3, wave.size), np.ones(wave.size),
                      header={"OBSID": 42})
    t = read_lamost_lrs([a, str(b)])
    assert len(t) == 2 and t.source_id.tolist() == [-1, -1]
    assert t.star_id.tolist() == ["a", "LAMOST OBSID 42"]
    assert t.missing[0, lamost_bin_centres() < 5900].all() and not t.missing[0, lamost_bin_centres() > 6100].any()
    assert not t.missing[1].any()
    assert np.nanmedian(t.values[1]) == pytest.approx(1.0)
    assert t.meta["layouts"] == {"DR1-DR7 primary image": 1, "DR8+ COADD table": 1}
    # the bin holding 6000 A is 77% masked: too few usable pixels, counted apart from the empty bins
    straddling = np.searchsorted(lamost_bin_edges(), 6000.0) - 1
    assert t.missing[0, straddling]
    assert t.meta["blanked"] == {"bins_without_usable_pixel": int(t.missing[0].sum()) - 1,
                                 "bins_too_few_usable_pixels": 1}


@pytest.mark.parametrize("layout", ["old", "new"])
def test_lamost_bin_with_too_few_usable_pixels_is_missing_and_counted(tmp_path, layout):
    # a DR7-like Ca II K line: the core pixels are masked (ivar = 0), only the bright wings are left
    wave = lamost_pixels()
    edges = lamost_bin_edges()
    k = np.searchsorted(edges, 3934.8) - 1
    in_k = np.flatnonzero((wave >= edges[k]) & (wave < edges[k + 1]))
    flux = np.full(wave.size, 100.0)
    flux[in_k[4:16]] = 10.0  # the core, 12 of the bin's pixels
    ivar = np.full(wave.size, 1.0)
    ivar[in_k[4:16]] = 0.0
    # a bin losing 5 of its pixels keeps most of its width and stays; a wholly masked bin is empty
    in_60 = np.flatnonzero((wave >= edges[60]) & (wave < edges[61]))
    ivar[in_60[:5]] = 0.0
    ivar[(wave >= edges[80]) & (wave < edges[81])] = 0.0
    write = write_lrs_old if layout == "old" else write_lrs_new
    t = read_lamost_lrs(write(tmp_path / f"cak-{layout}.fits", wave, flux, ivar))
    # the wings alone would read 1.0, i.e. the continuum: far above the bin's true mean
    assert np.isnan(t.values[0, k]) and np.isnan(t.errors[0, k])
    assert np.isfinite(t.values[0, 60]) and t.values[0, 60] == pytest.approx(1.0)
    assert np.isnan(t.values[0, 80])
    assert t.missing[0].sum() == 2
    assert t.meta["blanked"] == {"bins_without_usable_pixel": 1, "bins_too_few_usable_pixels": 1}
    assert t.meta["min_bin_coverage"] == MIN_BIN_COVERAGE == 0.5


def test_lamost_bin_coverage_is_the_share_of_its_width_covered():
    edges = lamost_bin_edges()
    # a spectrum that starts inside bin 10: 60% of the bin covered keeps it, 30% does not
    for share, present in ((0.6, True), (0.3, False)):
        start = edges[11] - share * (edges[11] - edges[10])
        wave = np.geomspace(start, 9100.0, 20000)
        b = bin_to_lamost_grid(wave, np.ones(wave.size), np.ones(wave.size))
        assert b.coverage[0, 10] == pytest.approx(share, abs=0.01)
        assert np.isfinite(b.values[0, 10]) == present and b.too_few[0, 10] == (not present)
        assert np.isnan(b.values[0, :10]).all() and not b.too_few[0, :10].any()
        np.testing.assert_allclose(b.coverage[0, 11:], 1.0, atol=0.01)
    # two lone 1 A pixels in a ~22 A bin: not a measurement of the bin
    v, e = resample_to_lamost_grid([5000.0, 5001.0], [1.0, 2.0], [1.0, 3.0])
    assert np.isnan(v).all() and np.isnan(e).all()


def test_lamost_batch_binning_equals_single_spectrum_binning():
    rng = np.random.default_rng(3)
    wave = lamost_pixels()
    flux = rng.normal(5.0, 1.0, (4, wave.size))
    ivar = rng.uniform(0.5, 2.0, (4, wave.size))
    ivar[rng.random(ivar.shape) < 0.3] = 0.0  # scattered masks: some bins fall under half coverage
    ivar[1, 500:700] = 0.0
    flux[2, 900:950] = np.nan
    b = bin_to_lamost_grid(wave, flux, ivar)
    assert b.values.shape == b.errors.shape == b.coverage.shape == b.too_few.shape == (4, N_LAMOST)
    assert b.too_few.any() and np.isfinite(b.values).any()
    for i in range(4):
        v, e = resample_to_lamost_grid(wave, flux[i], ivar[i])
        np.testing.assert_array_equal(v, b.values[i])
        np.testing.assert_array_equal(e, b.errors[i])
    # a row's bins never depend on the other rows
    np.testing.assert_array_equal(bin_to_lamost_grid(wave, flux[2:3], ivar[2:3]).values, b.values[2:3])
    with pytest.raises(BadValueError):
        bin_to_lamost_grid(wave, flux, ivar[:, :-1])


def test_lamost_reader_errors(tmp_path):
    wave = lamost_pixels()
    ones = np.ones(wave.size)

    def raises(path, *parts, **kw):
        with pytest.raises(DataFileError) as ei:
            read_lamost_lrs(path, **kw)
        assert_names(ei, path.name, *parts)

    raises(write_lrs_new(tmp_path / "noivar.fits", wave, ones, ones, drop=("IVAR",)), "IVAR")
    raises(write_lrs_new(tmp_path / "nowave.fits", wave, ones, ones, drop=("WAVELENGTH",)), "WAVELENGTH")
    raises(write_lrs_old(tmp_path / "negivar.fits", wave, ones, np.where(wave > 5000, 1.0, -1.0)), "IVAR")
    raises(write_lrs_new(tmp_path / "nanflux.fits", wave, np.full(wave.size, np.nan), ones), "FLUX",
           "no usable pixels")
    raises(write_lrs_old(tmp_path / "masked.fits", wave, ones, ones, andmask=np.ones(wave.size)),
           "no usable pixels")
    raises(write_lrs_new(tmp_path / "decreasing.fits", wave[::-1], ones, ones), "WAVELENGTH")
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column(name="X", format="E", array=np.ones(3))], name="OTHER")]).writeto(tmp_path / "nocoadd.fits")
    raises(tmp_path / "nocoadd.fits", "COADD")
    (tmp_path / "junk.fits").write_bytes(b"SIMPLE  = garbage" + bytes(range(256)) * 20)
    raises(tmp_path / "junk.fits", "not a readable FITS file")
    # a bad file in a list: raise by default, or skip it and say so
    good = write_lrs_old(tmp_path / "good.fits", wave, ones, ones)
    raises(tmp_path / "junk.fits")
    t = read_lamost_lrs([good, tmp_path / "junk.fits"], on_error="skip")
    assert len(t) == 1 and t.meta["skipped"][0]["file"].endswith("junk.fits")
