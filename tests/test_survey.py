"""Streaming survey labelling: the bulk XP reader, stellarlm label (resumable, per rank)."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stellarlm.data.gaia_bulk import N_CORR, bulk_rows, iter_bulk_xp, iter_xp_chunks, write_bulk_file
from stellarlm.errors import DataFileError

ROOT = Path(__file__).resolve().parent.parent


def _array(cell: bytes) -> np.ndarray:
    return np.array([float(x) for x in cell.strip(b'"[]').split(b",")])


@pytest.fixture(scope="module")
def rows():
    header, lines = bulk_rows(7, seed=3, first_source_id=5937083312263887600)
    return header, lines


def _write(path: Path, header: bytes, lines: list[bytes]) -> Path:
    data = header + b"".join(lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _replace_band(line: bytes, band: str, names: list[str], missing: bytes) -> bytes:
    """The line with the band's three arrays written as ``missing`` (b'null' or b'')."""
    from stellarlm.data.gaia_bulk import _split_fields

    fields = _split_fields(line.rstrip(b"\n"), b",")
    out = []
    for name, f in zip(names, fields):
        if name.startswith(band + "_coefficient"):
            out.append(missing)
        else:
            out.append(b'"' + f + b'"' if f.startswith(b"[") else f)
    return b",".join(out) + b"\n"


def test_bulk_reader_gzip_null_and_empty(tmp_path, rows):
    header, lines = rows
    names = [n for n in header.splitlines()[-1].decode().split(",")]
    lines = list(lines)
    lines[2] = _replace_band(lines[2], "bp", names, b"null")  # the archive's missing value
    lines[4] = _replace_band(lines[4], "rp", names, b"")      # a mirror's empty field
    path = _write(tmp_path / "XpContinuousMeanSpectrum_000001-000002.csv.gz", header, lines)
    chunks = list(iter_xp_chunks(path, chunk_rows=3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    sid = np.concatenate([c.source_id for c in chunks])
    assert sid.tolist() == [5937083312263887600 + i for i in range(7)]  # 19 digits, exact
    coeff = np.concatenate([c.coefficients for c in chunks])
    corr = np.concatenate([c.correlations for c in chunks])
    assert coeff.shape == (7, 2, 55) and corr.shape == (7, 2, N_CORR)
    first = lines[0].split(b'"')
    np.testing.assert_array_equal(coeff[0, 0], _array(first[1]))           # bp_coefficients, exact
    np.testing.assert_array_equal(corr[0, 1], _array(first[11]))           # rp correlations
    assert np.isnan(coeff[2, 0]).all() and np.isfinite(coeff[2, 1]).all()  # null band
    assert np.isnan(coeff[4, 1]).all() and np.isfinite(coeff[4, 0]).all()  # empty band
    assert np.isnan(corr[2, 0]).all()
    assert chunks[0].n_relevant.shape == (3, 2) and chunks[0].g is None
    # the same numbers whether gzipped or not, and whatever the chunk size
    plain = _write(tmp_path / "plain.csv", header, lines)
    again = np.concatenate([c.coefficients for c in iter_bulk_xp(plain, chunk_rows=100)])
    np.testing.assert_array_equal(again, coeff)
    threaded = list(iter_bulk_xp(path, chunk_rows=2, workers=2))  # chunks parsed in threads, in order
    np.testing.assert_array_equal(np.concatenate([c.source_id for c in threaded]), sid)
    np.testing.assert_array_equal(np.concatenate([c.correlations for c in threaded]), corr)


@pytest.mark.parametrize("damage, what", [
    (lambda s: s.replace(b'"[', b'"[x', 1), "not a number"),
    (lambda s: s.replace(b'"[', b'"[1.0,', 1), "56 elements, expected 55"),
    (lambda s: s.rsplit(b",", 1)[0] + b"\n", "fields"),
])
def test_bulk_reader_malformed_row_names_the_line(tmp_path, rows, damage, what):
    header, lines = rows
    lines = list(lines)
    lines[5] = damage(lines[5])
    path = _write(tmp_path / "bad.csv.gz", header, lines)
    line_no = header.count(b"\n") + 6  # header lines, then the sixth data row
    for workers in (1, 2):
        with pytest.raises(DataFileError) as err:
            list(iter_xp_chunks(path, chunk_rows=4, workers=workers))
        msg = str(err.value)
        assert "bad.csv.gz" in msg and f"line {line_no}" in msg and what in msg, msg


def test_bulk_chunks_give_the_tokens_of_the_explicit_covariance(rows):
    """The packed-correlation product in coefficients_to_tokens equals sqrt(diag(D C D^T)) with each
    star's (55, 55) covariance built explicitly; a missing band, and a band without correlations
    (taken as uncorrelated), as the bulk reader delivers them."""
    from stellarlm.data.xp_basis import (bin_samples, coefficients_to_tokens, correlation_matrix,
                                         xp_design_matrix)
    from stellarlm.vocab import xp_flux_scale

    c = next(iter_xp_chunks_from(rows))
    coeff, err, corr = c.coefficients, c.errors, c.correlations.copy()
    coeff[1, 0] = np.nan       # a missing band
    corr[3, 1] = np.nan        # a band without correlations: treated as uncorrelated
    g = np.linspace(12, 16, len(c))
    v, e = coefficients_to_tokens(coeff, err, g, corr)
    _, design = xp_design_matrix()
    for i in (0, 3):
        var = np.zeros(len(design))
        for b in range(2):
            r = correlation_matrix(np.nan_to_num(corr[i, b])) if np.isfinite(corr[i, b]).all() else np.eye(55)
            d = design[:, 55 * b:55 * (b + 1)]
            var += np.einsum("wi,ij,wj->w", d, r * np.outer(err[i, b], err[i, b]), d)
        np.testing.assert_allclose(e[i], bin_samples(np.sqrt(var)[None])[0] * xp_flux_scale([g[i]])[0], rtol=1e-9)
    assert np.isnan(v[1]).any() and np.isfinite(v[1]).any()


def iter_xp_chunks_from(rows, tmp=None):
    import tempfile

    header, lines = rows
    d = Path(tempfile.mkdtemp())
    return iter_xp_chunks(_write(d / "x.csv", header, lines), chunk_rows=100)


# --- labelling ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Three bulk files (one gzipped bigger one, two plain) and a photometry join file."""
    d = tmp_path_factory.mktemp("survey")
    inputs = [write_bulk_file(d / "XpContinuousMeanSpectrum_000000-000001.csv.gz", 300, pool=20, seed=1,
                              first_source_id=1000),
              write_bulk_file(d / "XpContinuousMeanSpectrum_000002-000003.csv", 90, pool=20, seed=2,
                              first_source_id=5000),
              write_bulk_file(d / "XpContinuousMeanSpectrum_000004-000005.csv", 50, pool=20, seed=3,
                              first_source_id=9000)]
    rng = np.random.default_rng(0)
    ids = np.r_[np.arange(1000, 1300), np.arange(5000, 5090), np.arange(9000, 9040)]  # 10 stars without G
    phot = d / "GaiaSource_000000-000005.csv.gz"
    with gzip.open(phot, "wt") as f:
        f.write("# a comment line, as the archive writes\nsource_id,ra,phot_g_mean_mag\n")
        for s in ids:
            f.write(f"{s},1.0,{rng.uniform(11, 16):.5f}\n")
    return d, inputs, phot


def _read(path):
    from astropy.io import fits

    with fits.open(path) as h:
        return h[1].header, {k: np.array(h[1].data[k]) for k in h[1].columns.names}


def test_label_resumable(tiny_model, survey, tmp_path):
    from stellarlm.survey import label_files, label_one, Labeller, Photometry, output_name

    _, model_dir = tiny_model
    _, inputs, phot = survey
    out = tmp_path / "out"
    kw = dict(want=["teff", "logg"], photometry=[phot], quantiles=[0.16, 0.84], progress=False, chunk_rows=64)
    res = label_files(inputs, model_dir, out, **kw)
    assert [r.status for r in res] == ["done"] * 3
    first = out / output_name(inputs[0])
    head, cols = _read(first)
    assert len(cols["source_id"]) == 300 and len(np.unique(cols["source_id"])) == 300
    assert {"teff", "teff_err", "logg_err", "teff_q16", "logg_q84", "g", "g_source"} <= set(cols)
    assert head["MODELSHA"] == Labeller(model_dir, ["teff"]).model_sha256 and len(head["INPUTSHA"]) == 64
    assert head["STLMVER"] and head["NSTARS"] == 300
    import hashlib

    assert head["INPUTSHA"] == hashlib.sha256(inputs[0].read_bytes()).hexdigest()
    assert np.isfinite(cols["teff"]).all() and (cols["teff_q16"] < cols["teff_q84"]).all()
    third = _read(out / output_name(inputs[2]))[1]
    g_source = [s.strip() for s in third["g_source"].astype(str)]
    assert g_source.count("photometry") == 40 and g_source.count("none") == 10
    assert np.isnan(third["teff"][np.array(g_source) == "none"]).all()
    reference = {p: _read(out / output_name(p))[1] for p in inputs}
    stamp = first.stat().st_mtime_ns

    # kill the labelling of the first (biggest) file half way: a half-written temporary file is left
    first.unlink()
    lab = Labeller(model_dir, ["teff", "logg"], quantiles=[0.16, 0.84], batch_size=64)  # a batch a chunk
    with pytest.raises(KeyboardInterrupt):
        label_one(inputs[0], out, lab, chunk_rows=64, photometry=Photometry([phot]), progress=False,
                  _stop_after_chunks=2)
    assert not first.exists() and (out / f".{first.name}.tmp").exists()
    untouched = {p: (out / output_name(p)).stat().st_mtime_ns for p in inputs[1:]}
    res = label_files(inputs, model_dir, out, **kw)
    assert [r.status for r in res] == ["done", "skipped", "skipped"]
    assert not (out / f".{first.name}.tmp").exists()
    assert {p: (out / output_name(p)).stat().st_mtime_ns for p in inputs[1:]} == untouched
    again = _read(first)[1]
    assert again.keys() == reference[inputs[0]].keys()
    for k in again:
        np.testing.assert_array_equal(again[k], reference[inputs[0]][k])
    assert first.stat().st_mtime_ns != stamp


def test_label_two_ranks_same_rows_as_one(tiny_model, survey, tmp_path):
    """Two processes with RANK/WORLD_SIZE set as torchrun sets them write the same rows as one."""
    _, model_dir = tiny_model
    d, inputs, phot = survey
    bad = d / "XpContinuousMeanSpectrum_broken.csv"
    text = inputs[2].read_bytes().splitlines(keepends=True)
    text[-3] = text[-3].replace(b'"[', b'"[oops', 1)
    bad.write_bytes(b"".join(text))
    args = [sys.executable, "-m", "stellarlm.cli", "label", *map(str, inputs), str(bad), "--model", str(model_dir),
            "--want", "teff", "m_h", "--photometry", str(phot), "--threads", "1", "--no-progress",
            "--chunk-rows", "64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run(out, rank, world):
        return subprocess.Popen(args + ["--out", str(out)], env={**env, "RANK": str(rank), "WORLD_SIZE": str(world)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    one = run(tmp_path / "one", 0, 1)
    two = [run(tmp_path / "two", r, 2) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in [one, *two]]
    codes = [p.returncode for p in [one, *two]]
    assert codes[0] == 1, outs[0]          # one failed input
    assert sorted(codes[1:]) == [0, 1], outs  # ... on exactly one of the two ranks
    log = (tmp_path / "one" / "label.log").read_text()
    assert "FAILED" in log and "broken" in log and f"line {len(text) - 2}" in log, log
    files_one = sorted(p.name for p in (tmp_path / "one").glob("*.labels.fits"))
    files_two = sorted(p.name for p in (tmp_path / "two").glob("*.labels.fits"))
    assert files_one == files_two and len(files_one) == 3

    def rows(d):
        cols = [_read(p)[1] for p in sorted(d.glob("*.labels.fits"))]
        sid = np.concatenate([c["source_id"] for c in cols])
        order = np.argsort(sid)
        return sid[order], {k: np.concatenate([c[k] for c in cols])[order] for k in ("teff", "m_h_err")}

    sid1, v1 = rows(tmp_path / "one")
    sid2, v2 = rows(tmp_path / "two")
    assert len(sid1) == 440 and len(np.unique(sid1)) == 440
    np.testing.assert_array_equal(sid1, sid2)
    for k in v1:
        np.testing.assert_array_equal(v1[k], v2[k])


def test_assignment_is_deterministic_and_complete(tmp_path):
    from stellarlm.survey import assign

    paths = []
    for i, size in enumerate([5, 50, 20, 20, 1, 70, 3]):
        p = tmp_path / f"f{i}.csv"
        p.write_bytes(b"x" * size)
        paths.append(p)
    shares = assign(paths, 3)
    assert shares == assign(list(reversed(paths)), 3)
    assert sorted(sum(shares, [])) == sorted(paths)
    assert all(shares)


def test_label_datalink_product_with_synthetic_g(tiny_model, tmp_path):
    """A DataLink XP_CONTINUOUS product (FITS, one real star, no G) through the existing readers."""
    from stellarlm.data.gaia_xp import astroquery_example_files
    from stellarlm.survey import label_files, output_name

    _, model_dir = tiny_model
    src = astroquery_example_files()["XP_CONTINUOUS"]["fits"]
    res = label_files([src], model_dir, tmp_path, want=["teff"], synthetic_g=True, progress=False)
    assert res[0].status == "done", res[0].reason
    head, cols = _read(tmp_path / output_name(Path(src)))
    assert cols["source_id"].tolist() == [5937083312263887616]
    assert cols["g_source"].astype(str)[0].strip() == "synthetic" and abs(cols["g"][0] - 13.871) < 0.01
    assert np.isfinite(cols["teff"]).all()


@pytest.mark.parametrize("stem_tokens", [0, 2])
def test_fixed_input_encoder_is_the_network_encoder(stem_tokens):
    """The labeller's shortcut (tables looked up once, patches summed by a matrix product) encodes
    XP + G as the network does, with and without a spectrum stem."""
    import torch

    from stellarlm.model import ModelConfig, StellarTransformer
    from stellarlm.survey import FixedInputEncoder
    from stellarlm.vocab import XP_NAMES, Vocabulary

    vocab = Vocabulary.default()
    torch.manual_seed(0)
    net = StellarTransformer(ModelConfig(n_vocab=len(vocab), d_model=32, n_heads=2, n_encoder_layers=2,
                                         n_decoder_layers=1, patch_of=vocab.patches(5, 20),
                                         stem_of=vocab.spectra(), stem_tokens=stem_tokens)).eval()
    ids = vocab.ids(XP_NAMES + ["g"])
    values, errors = torch.randn(5, len(ids)), torch.rand(5, len(ids)) * 0.1 + 0.01
    t = torch.as_tensor(ids).expand(5, -1)
    with torch.no_grad():
        want, want_mask = net.encode(t, values, errors, torch.ones_like(t, dtype=torch.bool))
        got, got_mask = FixedInputEncoder(net, ids).encode(values, errors)
    assert torch.equal(want_mask, got_mask)
    # encode packs the patches in id order, as the shortcut does
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ranks_share_gpus_by_local_rank():
    from stellarlm.survey import rank_device

    # torchrun with more labelling ranks than GPUs: ranks wrap round the GPUs
    assert [rank_device("cuda", str(r), 2) for r in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert rank_device("cuda", None, 2) == "cuda"  # not under torchrun: torch's current GPU
    assert rank_device("cuda:1", "3", 2) == "cuda:1"  # an explicit GPU is kept
    assert rank_device("cpu", "3", 2) == "cpu"


def test_the_compiled_parser_gives_pandas_numbers_to_the_bit(rows):
    """The bulk reader's fast path (numba) and pandas' C parser agree on every number of real-layout
    rows and on the edge cases of the fast path's range; what it cannot promise goes to pandas."""
    pytest.importorskip("numba")
    from stellarlm.data.fast_floats import parse_floats
    from stellarlm.data.gaia_bulk import _parse_floats

    _, lines = rows
    cells = b",".join(c for line in lines for c in line.split(b'"')[1::2])
    rng = np.random.default_rng(0)
    edges = [b"0", b"-0.0", b"+7", b"9007199254740991", b"9007199254740993", b"1e22", b"1e23", b"1e-22",
             b"4.9e-324", b"123456789012345678", b"0.000000000000000000001234", b"1.5E+03", b".5", b"5.",
             b"null", b" 3.25 ", b"nan"]
    edges += [repr(float(x)).encode() for x in rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)]
    edges += [str(np.float32(x)).encode() for x in rng.standard_normal(2000)]
    buf = cells.translate(bytes.maketrans(b",[]", b"\n  ")) + b"\n" + b"\n".join(edges) + b"\n"
    expected = _parse_floats(buf)
    fast = parse_floats(buf, expected.size, slow_parser=_parse_floats)
    assert fast is not None and fast.size > 20000
    assert np.array_equal(fast.view(np.int64), expected.view(np.int64))  # bit for bit, NaN and -0.0 too
    with pytest.raises(ValueError):  # not a number: pandas' error reaches the reader, which names the line
        parse_floats(b"1.0\n2.0.0\n", 2, slow_parser=_parse_floats)


def test_the_compiled_row_scanner_gives_the_python_readers_chunks_to_the_bit(rows, monkeypatch):
    """A block parsed in one compiled pass (numba) equals the row-by-row Python reader's chunk (its
    numbers by pandas' C parser, as before the compiled paths) in
    every array, scalar and line number: regular rows, CRLF endings, blank lines, a trailing
    delimiter, spaces inside the arrays, 17-digit numbers (left to pandas). A block with any row
    the scanner does not promise to read (a null band, a wrong count) is left to the Python reader."""
    pytest.importorskip("numba")
    from stellarlm.data import gaia_bulk
    from stellarlm.data.fast_floats import parse_rows
    from stellarlm.data.gaia_bulk import _Layout, _parse_floats, _parse_lines, _split_fields

    def _parse_lines_python(*args):  # the reference: every number by pandas
        with monkeypatch.context() as m:
            m.setattr(gaia_bulk, "parse_floats_fast", lambda *a, **k: None)
            return gaia_bulk._parse_lines_python(*args)

    header, lines = rows
    names = [n.decode().strip().strip('"') for n in _split_fields(header.splitlines()[-1], b",")]
    layout = _Layout(names, Path("x.csv"), 1)

    def same(block):
        a = _parse_lines_python(block, 10, layout, Path("x.csv"), b",")
        b = _parse_lines(block, 10, layout, Path("x.csv"), b",")
        for k in ("source_id", "coefficients", "errors", "correlations", "n_relevant"):
            x, y = getattr(a, k), getattr(b, k)
            assert x.shape == y.shape and np.array_equal(x.view(np.uint8), y.view(np.uint8)), k
        np.testing.assert_array_equal(a.extra["line"], b.extra["line"])

    lines = list(lines)

    def first_cell(line, edit):  # the line with its first array cell's text edited
        parts = line.split(b'"')
        parts[1] = edit(parts[1])
        return b'"'.join(parts)

    odd = [lines[0].replace(b"\n", b"\r\n"), b"\n", b"  \t\n",
           first_cell(lines[1], lambda c: c.replace(b"[", b"[ ").replace(b",", b" , ")),  # spaces around numbers
           first_cell(lines[2], lambda c: b"[1.00000000000000000001," + c.split(b",", 1)[1]),  # 21 digits
           first_cell(lines[3], lambda c: b"[-0.0,1e5,.5,5.,+2E-3," + c.split(b",", 5)[5]),
           lines[4].replace(b",", b", ", 3)]  # spaces before scalars
    for block in (lines, odd, lines[:1]):
        same(block)
        assert parse_rows(b"".join(block), b",", layout.field_array, layout.arr_len, layout.arr_off, len(block),
                          _parse_floats) is not None
    names_line = header.splitlines()[-1].decode().split(",")
    for bad in (_replace_band(lines[3], "bp", names_line, b"null"), lines[3].replace(b'"[', b'"[1.0,', 1),
                lines[3].replace(b'"[', b"[", 1)):
        block = lines[:3] + [bad]
        assert parse_rows(b"".join(block), b",", layout.field_array, layout.arr_len, layout.arr_off, len(block),
                          _parse_floats) is None
        try:
            same(block)
        except DataFileError:  # both readers raise, with the Python reader's message
            with pytest.raises(DataFileError):
                _parse_lines(block, 10, layout, Path("x.csv"), b",")
