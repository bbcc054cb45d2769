"""`python tests/parity/run.py sam3d-objects SET_DIR`: passes on a set, fails on a wrong model, refuses a non-set.

The component tests (tests/test_sam3d_objects_*.py) run every component's rows in-process; here the script itself
runs as a subprocess on a component-limited copy of parity_a (symlinks), so that it stays cheap.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.conftest import SAM3D_OBJECTS_FIXTURES as FIXTURES

PARITY_A = FIXTURES / "parity_a"
CHEAP_COMPONENTS = ("condition_embedder", "ss_generator", "slat_generator")

pytestmark = pytest.mark.skipif(not PARITY_A.is_dir(), reason=f"fixtures not found at {PARITY_A}")


def run_parity(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "parity" / "run.py"), "sam3d-objects", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def link_set(root: Path, components: tuple[str, ...]) -> Path:
    """A set folder of symlinks to some of parity_a's components, next to the fixtures' configs_used."""
    (root / "configs_used").symlink_to(FIXTURES / "configs_used", target_is_directory=True)
    folder = root / "set"
    folder.mkdir()
    for name in components:
        (folder / name).symlink_to(PARITY_A / name, target_is_directory=True)
    return folder


def test_runner_passes_on_parity_a_components(tmp_path: Path) -> None:
    run = run_parity(link_set(tmp_path, CHEAP_COMPONENTS))
    assert run.returncode == 0, run.stdout + run.stderr
    summary = re.search(r"^(\d+)/(\d+) within tolerance$", run.stdout, re.MULTILINE)
    assert summary and summary.group(1) == summary.group(2) and int(summary.group(1)) > 30, run.stdout
    assert "FAIL" not in run.stdout
    for name in CHEAP_COMPONENTS:
        assert f"ok   {name}/" in run.stdout
    assert "slat_generator/slat_feats_denorm" in run.stdout  # pipeline.yaml found next to the set


def test_runner_fails_on_a_perturbed_checkpoint(tmp_path: Path) -> None:
    """Not vacuous: 1e-2 on the flow's output bias is reported and exits 1."""
    folder = link_set(tmp_path, ())
    component = folder / "slat_generator"
    component.mkdir()
    for source in (PARITY_A / "slat_generator").iterdir():
        if source.suffix != ".ckpt":
            (component / source.name).symlink_to(source)
    checkpoint = torch.load(PARITY_A / "slat_generator" / "slat_generator.ckpt", map_location="cpu", weights_only=True)
    key = "_base_models.generator.reverse_fn.backbone.out_layer.bias"
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1e-2
    torch.save(checkpoint, component / "slat_generator.ckpt")
    run = run_parity(folder)
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(r"^FAIL slat_generator/v_cond ", run.stdout, re.MULTILINE), run.stdout


def test_runner_refuses_a_folder_without_components(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not a parity set\n")
    (tmp_path / "unrelated").mkdir()
    run = run_parity(tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no SAM 3D Objects component folder" in run.stderr
