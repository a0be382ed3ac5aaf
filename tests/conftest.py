"""Shared fixtures: a small build of the embedded data (first rows of the real source file)."""

import pytest

from stellarlm.vocab import XP_NAMES

XP_G = XP_NAMES + ["g"]
TINY = dict(d_model=32, n_heads=2, n_encoder_layers=2, n_decoder_layers=1)


@pytest.fixture(scope="session")
def small_embedded(tmp_path_factory):
    from stellarlm.data.embedded import build_embedded

    return build_embedded(tmp_path_factory.mktemp("embedded"), max_stars=3000, progress=False)


def _slice(table):
    # XP, G and labels: enough to learn labels from spectra, small enough to train in seconds
    return table.select(XP_G + ["teff", "logg", "m_h"])


@pytest.fixture(scope="session")
def tiny_model(small_embedded, tmp_path_factory):
    """A tiny model trained for a few seconds on the small build (XP + G + labels)."""
    from stellarlm import StellarLM
    from stellarlm.model import ModelConfig
    from stellarlm.training import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny")
    cfg = TrainConfig(out_dir=str(out), steps=400, batch_size=64, lr=3e-3, warmup_steps=20,
                      checkpoint_every=1000, p_group=1.0, model=ModelConfig(**TINY), seed=0)
    train(_slice(small_embedded), cfg, progress=False)
    return StellarLM.load(out), out
