"""Where the node finds its weights: installed with `pip install .` (from any directory), or
$SRNODE_WEIGHTS; and what it says when they are not there."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.paths import REPO

CONFIG = REPO / "config" / "node.yaml"


def _config_check(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("SRNODE_WEIGHTS", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(CONFIG)], cwd=cwd,
                          env={**environ, **env}, capture_output=True, text=True, timeout=120)


def test_pip_install_gives_a_node_that_finds_its_weights_from_any_directory(tmp_path):
    source, target, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("node", "pipelines", "weights"):  # a copy of the tree: a build leaves build/ behind
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in (target / "srnode_weights").glob("*.safetensors")) == \
        sorted(p.name for p in (REPO / "weights").glob("*.safetensors"))
    where = subprocess.run([sys.executable, "-c", "import pipelines.weights as w; print(w.__file__, w.weights_dir())"],
                           cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(target)},
                           capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(target / "pipelines" / "weights.py"), str(target / "srnode_weights")]
    checked = _config_check(elsewhere, PYTHONPATH=str(target))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "cannot run" not in checked.stdout + checked.stderr


def test_missing_weights_say_where_the_node_looked_and_name_SRNODE_WEIGHTS(tmp_path):
    checked = _config_check(REPO, SRNODE_WEIGHTS=str(tmp_path / "none"))
    assert checked.returncode == 1
    problems = [line for line in checked.stderr.splitlines() if "cannot run" in line]
    assert problems and all(f"looked in {tmp_path / 'none'} (from SRNODE_WEIGHTS)" in line for line in problems)
    assert "Traceback" not in checked.stderr


def test_weights_not_found_anywhere_name_every_place_looked_and_never_another_packages_folder(tmp_path, monkeypatch):
    """An installed ``pipelines`` sits in site-packages: a ``weights/`` there is another package's, not
    srnode's. With no SRNODE_WEIGHTS and no srnode_weights package, the error lists each place looked."""
    import pytest

    from pipelines import weights

    site = tmp_path / "site-packages"
    (site / "pipelines").mkdir(parents=True)
    (site / "weights").mkdir()
    (site / "weights" / "mdrn.safetensors").write_bytes(b"another package's file")
    monkeypatch.setattr(weights, "__file__", str(site / "pipelines" / "weights.py"))
    monkeypatch.setattr(weights, "INSTALLED_PACKAGE", "srnode_weights_absent")
    monkeypatch.delenv("SRNODE_WEIGHTS", raising=False)
    folder = weights.weights_dir()
    assert folder == weights.NOT_FOUND and not folder.exists()
    with pytest.raises(weights.WeightsError) as raised:
        weights.load(folder / "mdrn.safetensors")
    assert str(raised.value) == (
        f"weights file mdrn.safetensors is missing: looked in $SRNODE_WEIGHTS (not set), {site / 'weights'} (the "
        "source tree's weights/: not a source tree: no pyproject.toml beside it), the installed package "
        "srnode_weights_absent (not installed); set SRNODE_WEIGHTS to the folder that holds the weights; train it "
        "(see its model card) or restore it from the repository")
    (site / "pyproject.toml").write_text("")  # a checkout: its weights/ is the source tree's
    assert weights.weights_dir() == site / "weights"
