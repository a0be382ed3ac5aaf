"""Real LAMOST DR10 tokens against the synthetic LAMOST-like ones: median spectra of dwarfs (logg > 3.8)
in three Teff bins, their ratio across the grid and the bins' relative errors (docs/data.md).

    python benchmarks/experiments/lamost_real_vs_synthetic.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lamost_dr10  # noqa: E402

from stellarlm import load_embedded  # noqa: E402
from stellarlm.data.lamost import lamost_bin_centres  # noqa: E402
from stellarlm.vocab import LAMOST_NAMES  # noqa: E402

TEFF_BINS = ((5000, 5500), (5500, 6000), (6000, 6500))


def main() -> None:
    real_table, labels, _ = lamost_dr10.load()
    embedded = load_embedded()
    wave = lamost_bin_centres()
    real, synthetic = real_table.select(LAMOST_NAMES), embedded.select(LAMOST_NAMES)
    teff, logg = embedded.column("teff"), embedded.column("logg")
    for lo, hi in TEFF_BINS:
        in_real = (labels["teff"] >= lo) & (labels["teff"] < hi) & (labels["logg"] > 3.8)
        # synthetic stars with every bin: a median over partly empty spectra would mix stars per bin
        in_syn = (teff >= lo) & (teff < hi) & (logg > 3.8) & np.isfinite(synthetic.values).all(1)
        ratio = np.nanmedian(real.values[in_real], 0) / np.nanmedian(synthetic.values[in_syn], 0)
        print(lo, hi, "n real", in_real.sum(), "n synthetic", in_syn.sum())
        for i in range(0, len(wave), 20):
            print(f"  {wave[i]:6.0f} A real/synthetic {ratio[i]:.3f}")
        rel_real = np.nanmedian(real.errors[in_real] / real.values[in_real])
        rel_syn = np.nanmedian(synthetic.errors[in_syn] / synthetic.values[in_syn])
        print(f"  median relative error: real {rel_real:.4f}, synthetic {rel_syn:.4f}")
    print("median snrg of the real spectra", np.median(labels["snrg"]))


if __name__ == "__main__":
    main()
