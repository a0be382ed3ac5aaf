"""The built wheel carries the default model: installed (not editable) into a fresh environment, it
answers a query from a directory outside the source tree. No network: ``--no-deps``, and the new
environment sees the running one's packages (torch, numpy, astropy, ...) through a ``.pth`` file."""

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what the build needs (a copy, so the build leaves no build/ or *.egg-info in the checkout)
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "stellarlm", "vocab", "models/default", "models/lamost_dr10")

SCRIPT = """
import os, sys
from pathlib import Path
import stellarlm
from stellarlm import StellarLM
from stellarlm.cli import DEFAULT_MODEL
env = Path(sys.prefix).resolve()
assert Path(stellarlm.__file__).resolve().is_relative_to(env), stellarlm.__file__
assert DEFAULT_MODEL.resolve().is_relative_to(env) and (DEFAULT_MODEL / "model.safetensors").is_file(), DEFAULT_MODEL
assert (DEFAULT_MODEL / "README.md").is_file()
for model in (StellarLM.load("default", device="cpu"), StellarLM.pretrained(device="cpu")):
    out = model.query({"teff": [4800.0], "logg": [2.5], "m_h": [-0.2]}, want=["g", "k"])
    assert out.colnames == ["g", "g_err", "k", "k_err"], out.colnames
    assert abs(float(out["g"][0]) - float(out["k"][0])) < 10 and float(out["k_err"][0]) > 0
print("answered", float(out["g"][0]), float(out["k"][0]))
"""


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(cmd, cwd, timeout=120) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{cmd}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.slow
def test_wheel_ships_the_default_model_and_answers_outside_the_tree(tmp_path):
    src = tmp_path / "src"
    for rel in SOURCES:
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / rel, dest)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src], cwd=tmp_path)
    (wheel,) = dist.glob("stellarlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("model.json", "model.safetensors", "README.md"):
        assert f"stellarlm/models_default/{f}" in names
    assert "stellarlm/vocab_files/tokens.json" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    # a fresh environment that also sees this one's packages (plain paths: no .pth of ours is run,
    # so an editable install of the checkout stays invisible)
    env_dir = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    new_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).strip())
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (new_site / "_parent_env.pth").write_text("\n".join(parents) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run([py, "-c", SCRIPT], cwd=elsewhere)
    assert "answered" in out
    # the command line finds the packaged model as well
    from astropy.table import Table

    Table({"teff": [4800.0], "logg": [2.5], "m_h": [-0.2]}).write(elsewhere / "stars.ecsv")
    _run([env_dir / "bin" / "stellarlm", "query", "--model", "default", "--input", "stars.ecsv", "--want", "k",
          "--output", "labels.ecsv"], cwd=elsewhere)
    assert Table.read(elsewhere / "labels.ecsv").colnames == ["k", "k_err"]
