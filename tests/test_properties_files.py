"""Property-based: damaged files and checkpoints, and random training options, give a documented
stellarlm error or the right answer; never another exception, never a silently different result.

- a gzipped XP file (the astroquery star's archive product, ECSV and FITS) with random bytes changed:
  DataFileError, or the very table the intact file gives (a change the gzip format does not cover,
  such as its time stamp, changes nothing);
- a saved model with a random byte of a random file changed: a StellarLMError, or (a change that
  alters nothing the model uses, such as a key of checksums.json it does not read) the very same
  weights;
- random training options, valid or not: ConfigError before any work, or a run that trains.
"""

import gzip
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from stellarlm import StellarLMError
from stellarlm.data.gaia_xp import astroquery_example_files, read_xp_continuous
from stellarlm.errors import ConfigError, DataFileError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

OUTCOMES = Counter()
G = [13.871]


@pytest.fixture(scope="module")
def gz_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("gz")
    files = {}
    for fmt in ("ecsv", "fits"):
        src = astroquery_example_files()["XP_CONTINUOUS"][fmt]
        dst = out / f"xp.{fmt}.gz"
        with open(src, "rb") as f, gzip.open(dst, "wb") as g:
            shutil.copyfileobj(f, g)
        files[fmt] = (dst.read_bytes(), read_xp_continuous(dst, g_mag=G))
    return files


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["ecsv", "fits"]), where=st.floats(0, 1, exclude_max=True),
       xor=st.integers(1, 255), truncate=st.booleans())
def test_a_damaged_gzip_xp_file_is_refused_or_changes_nothing(gz_files, tmp_path_factory, fmt, where, xor, truncate):
    data, intact = gz_files[fmt]
    data = bytearray(data)
    i = int(where * len(data))
    if truncate:
        data = data[:i]
    else:
        data[i] ^= xor
    path = tmp_path_factory.mktemp("bad") / f"xp.{fmt}.gz"
    path.write_bytes(bytes(data))
    try:
        t = read_xp_continuous(path, g_mag=G)
    except DataFileError as exc:
        assert "xp." in str(exc)
        OUTCOMES["gzip: clear error"] += 1
        return
    np.testing.assert_array_equal(t.values, intact.values)  # a change the format does not cover
    np.testing.assert_array_equal(t.errors, intact.errors)
    OUTCOMES["gzip: correct"] += 1


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 10), where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_a_damaged_saved_model_is_refused(tiny_model, tmp_path_factory, which, where, xor):
    from stellarlm import StellarLM

    _, model_dir = tiny_model
    copy = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("checkpoint", "*.lock", "metrics.jsonl"))
    files = sorted(p for p in copy.iterdir() if p.is_file())
    assert any(p.name == "checksums.json" for p in files)
    target = files[which % len(files)]
    data = bytearray(target.read_bytes())
    data[int(where * len(data))] ^= xor
    target.write_bytes(bytes(data))
    try:
        damaged = StellarLM.load(copy)
    except StellarLMError:
        OUTCOMES["model file: clear error"] += 1
        return
    intact = StellarLM.load(model_dir)
    for (k, a), (_, b) in zip(sorted(intact.model.state_dict().items()), sorted(damaged.model.state_dict().items())):
        assert torch.equal(a, b), (target.name, k)
    assert damaged.vocab == intact.vocab and damaged.meta == intact.meta, target.name
    OUTCOMES["model file: correct"] += 1


OPTIONS = {
    "steps": st.integers(-3, 3), "batch_size": st.integers(-2, 16), "lr": st.sampled_from([1e-3, 0.0, -1.0, float("nan")]),
    "p_group": st.floats(-0.5, 1.5), "p_gap": st.floats(-0.5, 1.5), "max_targets": st.integers(-1, 8),
    "patch_size": st.integers(-1, 6), "eval_every": st.integers(-1, 2), "checkpoint_every": st.integers(-1, 2),
}


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.fixed_dictionaries({}, optional=OPTIONS))
def test_random_training_options_are_refused_by_name_or_train(small_embedded, tmp_path_factory, options):
    from stellarlm.model import ModelConfig
    from stellarlm.training import TrainConfig, train

    table = small_embedded.select(["xp_500", "xp_698", "g", "teff", "logg"]).subset(slice(0, 200))
    settings_ = {"steps": 2, "batch_size": 8, **options}
    cfg = TrainConfig(out_dir=str(tmp_path_factory.mktemp("run")), warmup_steps=1,
                      model=ModelConfig(d_model=8, n_heads=2, n_encoder_layers=1, n_decoder_layers=1), **settings_)
    try:
        out = train(table, cfg, progress=False)
    except ConfigError as exc:
        assert any(name.replace("_", "-") in str(exc) for name in options), (options, str(exc))
        OUTCOMES["options: clear error"] += 1
        return
    assert (out / "model.safetensors").exists()
    OUTCOMES["options: trained"] += 1


def test_report_outcomes():
    """Prints what the property tests above saw (pytest -s shows it)."""
    print(dict(OUTCOMES))
