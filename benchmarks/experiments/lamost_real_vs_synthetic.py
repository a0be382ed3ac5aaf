"""Real LAMOST DR10 tokens against the synthetic LAMOST-like ones: median spectra of dwarfs (logg > 3.8)
in three Teff bins, their ratio across the grid and the bins relative errors (docs/data.md).

    python benchmarks/experiments/lamost_real_vs_synthetic.py
"""
import sys, numpy as np
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
import lamost_dr10
from stellarlm import load_embedded
from stellarlm.vocab import LAMOST_NAMES
from stellarlm.data.lamost import lamost_bin_centres
t, lab, info = lamost_dr10.load()
emb = load_embedded()
w = lamost_bin_centres()
R = t.select(LAMOST_NAMES)
E = emb.select(LAMOST_NAMES)
et, eg, em = emb.column('teff'), emb.column('logg'), emb.column('m_h')
for lo, hi in ((5000,5500),(5500,6000),(6000,6500)):
    sr = (lab['teff']>=lo)&(lab['teff']<hi)&(lab['logg']>3.8)
    se = (et>=lo)&(et<hi)&(eg>3.8)&np.isfinite(E.values).all(1)
    r = np.nanmedian(R.values[sr],0); s = np.nanmedian(E.values[se],0)
    ratio = r/s
    print(lo,hi,'n real',sr.sum(),'n syn',se.sum())
    for i in range(0,200,20): print('  %6.0f A real/syn %.3f'%(w[i], ratio[i]))
    print('  median rel err real %.4f syn %.4f'%(np.nanmedian(R.errors[sr]/R.values[sr]), np.nanmedian(E.errors[se]/E.values[se])))
print('snrg median real', np.median(lab['snrg']))
