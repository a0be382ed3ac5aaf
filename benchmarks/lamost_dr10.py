"""The real LAMOST DR10 set in ../shared/data/lamost_dr10: spectra -> lamost_* tokens, joined to LASP labels.

Read as a user with their own survey would: every file through :func:`stellarlm.data.lamost.read_lamost_lrs`
(files it refuses are listed with the reason), the labels joined by file name, the split the reader
gives (80/10/10 from a hash of the LAMOST designation, so a star observed twice stays on one side).
The table is cached under ``runs/lamost_dr10/`` (keyed by the reader's settings) so that the
benchmarks that use it read the 2,380 files once.

    python benchmarks/lamost_dr10.py        # read (or load the cache) and print a summary
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from stellarlm.data import lamost as lamost_reader
from stellarlm.data.lamost import read_lamost_lrs
from stellarlm.data.table import TokenTable
from stellarlm.vocab import LAMOST_NAMES, Vocabulary

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lamost_dr10"
CACHE = Path(__file__).resolve().parents[1] / "runs" / "lamost_dr10"
LABELS = ("teff", "logg", "feh")


def _reader_key() -> str:
    """What the cached tokens depend on: the reader's source text."""
    return hashlib.sha256(Path(lamost_reader.__file__).read_bytes()).hexdigest()[:16]


def pixels(files, cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """(wave, flux): the pipeline's own continuum-normalised flux (the NORMALIZATION column) of each
    file at full resolution on the first file's pixel grid, NaN where IVAR = 0 or ANDMASK is set:
    what a practitioner's model is fed. A file whose NORMALIZATION column is shorter than its FLUX
    (3 of the 2,380) gives an all-missing row."""
    from astropy.io import fits

    path = cache / "pixels.npz"
    if path.exists():
        d = np.load(path)
        return d["wave"], d["flux"]
    wave, rows = None, []
    for f in files:
        with fits.open(f, memmap=False) as h:
            d = h["COADD"].data
            w, norm, ivar, andmask = (np.asarray(d[c][0], dtype=np.float64)
                                      for c in ("WAVELENGTH", "NORMALIZATION", "IVAR", "ANDMASK"))
        if wave is None:
            wave = w
        if norm.shape != w.shape:  # a few files' NORMALIZATION is shorter than their FLUX: not usable
            rows.append(np.full(wave.shape, np.nan, np.float32))
            continue
        good = (ivar > 0) & (andmask == 0) & np.isfinite(norm)
        if w.shape == wave.shape and np.max(np.abs(w - wave)) < 1e-3:
            rows.append(np.where(good, norm, np.nan).astype(np.float32))
            continue
        # a plate whose grid starts a few pixels off: linear interpolation onto the first file's grid;
        # a pixel is missing where either neighbour is (or outside the file's range)
        x = np.interp(wave, w, np.where(good, norm, 0.0), left=np.nan, right=np.nan)
        bad = np.interp(wave, w, (~good).astype(float), left=1.0, right=1.0) > 0
        rows.append(np.where(bad, np.nan, x).astype(np.float32))
    flux = np.vstack(rows)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, wave=wave, flux=flux)
    return wave, flux


def load(data: Path = DATA, cache: Path = CACHE) -> tuple[TokenTable, dict[str, np.ndarray], dict]:
    """(tokens, labels, info): the spectra's lamost_* TokenTable, the LASP labels (teff, logg, feh, snrg,
    ra, dec, subclass, obsid, path) in the table's row order, and what was read or refused."""
    import pandas as pd

    key = _reader_key()
    tab_path, lab_path, info_path = cache / f"tokens_{key}.npz", cache / f"labels_{key}.npz", cache / f"info_{key}.json"
    if tab_path.exists() and lab_path.exists() and info_path.exists():
        table = TokenTable.load(tab_path)
        labels = dict(np.load(lab_path, allow_pickle=True))
        return table, labels, json.loads(info_path.read_text())
    cat = pd.read_csv(data / "labels.csv")
    files = [data / "spectra" / f for f in cat["file"]]
    table = read_lamost_lrs(files, on_error="skip", vocab=Vocabulary.default())
    read = {Path(f).name: i for i, f in enumerate(table.meta["files"])}
    rows = cat[cat["file"].isin(read)].copy()
    rows["_row"] = rows["file"].map(read)
    rows = rows.sort_values("_row")
    if list(rows["_row"]) != list(range(len(table))):
        raise ValueError(f"{data / 'labels.csv'}: not every read file has exactly one catalogue row")
    labels = {c: rows[c].to_numpy() for c in (*LABELS, "snrg", "ra", "dec", "obsid")}
    labels["subclass"] = rows["subclass"].astype(str).to_numpy()
    labels["path"] = np.array([str(data / "spectra" / f) for f in rows["file"]])
    info = {"files_listed": len(cat), "files_read": len(table), "skipped": table.meta["skipped"],
            "layouts": table.meta["layouts"], "blanked": table.meta["blanked"],
            "split_counts": {s: int((table.split == i).sum()) for i, s in enumerate(("train", "val", "test"))},
            "missing_token_fraction": float(np.mean(~np.isfinite(table.values)))}
    cache.mkdir(parents=True, exist_ok=True)
    table.save(tab_path)
    np.savez(lab_path, **labels)
    info_path.write_text(json.dumps(info, indent=1))
    return table, labels, info


def crossmatch_embedded(labels: dict, radius_arcsec: float = 3.0) -> dict:
    """How many of these LAMOST stars are embedded (APOGEE + XP) stars: nearest neighbour on the sky,
    the embedded stars' positions from their 2MASS-style APOGEE ids."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    from stellarlm import load_embedded
    from stellarlm.data.embedded import apogee_id_to_radec

    emb = load_embedded()
    ra, dec = apogee_id_to_radec(np.asarray(emb.star_id).astype(str))
    ok = np.isfinite(ra) & np.isfinite(dec)
    cat = SkyCoord(ra[ok] * u.deg, dec[ok] * u.deg)
    idx, sep, _ = SkyCoord(labels["ra"] * u.deg, labels["dec"] * u.deg).match_to_catalog_sky(cat)
    sep = sep.arcsec
    rows = np.nonzero(sep < radius_arcsec)[0]
    return {"radius_arcsec": radius_arcsec, "embedded_with_position": int(ok.sum()),
            "lamost_rows": rows.tolist(), "embedded_rows": np.nonzero(ok)[0][idx[rows]].tolist(),
            "matches": int((sep < radius_arcsec).sum()), "nearest_separation_arcsec_min": float(sep.min()),
            "nearest_separation_arcsec_median": float(np.median(sep))}


if __name__ == "__main__":
    t, lab, info = load()
    print(t)
    print(json.dumps({k: v for k, v in info.items() if k != "skipped"}, indent=1))
    print("skipped:", info["skipped"][:5])
    print("bins missing per spectrum:", np.percentile((~np.isfinite(t.select(LAMOST_NAMES).values)).sum(1), [50, 90, 99, 100]))
