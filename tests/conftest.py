"""Shared fixtures: a tiny random SAM 3 checkpoint in the exact facebook/sam3 layout, images, servers."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BPE_VOCAB = SHARED / "fixtures" / "sam3" / "bpe_simple_vocab_16e6.txt.gz"
SAM3D_BODY_PARITY = SHARED / "fixtures" / "sam3d_body" / "parity_a"
SAM3D_OBJECTS_FIXTURES = SHARED / "fixtures" / "sam3d_objects"


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights directory holding `sam3/`: the tiny random checkpoint, written the way the Hub has it."""
    from models.sam3.random_checkpoint import write_random_checkpoint

    if not BPE_VOCAB.is_file():
        pytest.fail(f"{BPE_VOCAB} is missing: the tests expect the repository checked out beside shared/")
    root = tmp_path_factory.mktemp("weights")
    write_random_checkpoint(root / "sam3", BPE_VOCAB, size="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def body_weights_dir(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sam3/` plus `sam-3d-body-dinov3/` in the Hub layout, holding the parity fixture's tiny checkpoint.

    That checkpoint is the release format with a shrunk DINOv3 and decoder; its `mhr_stub.pt` is a
    TorchScript stand-in with MHR's call signature and output shapes (18,439 vertices, 127 joints).
    """
    if not SAM3D_BODY_PARITY.is_dir():
        pytest.fail(f"{SAM3D_BODY_PARITY} is missing: the tests expect the repository checked out beside shared/")
    root = tmp_path_factory.mktemp("body-weights")
    (root / "sam3").symlink_to(weights_dir / "sam3")
    body = root / "sam-3d-body-dinov3"
    (body / "assets").mkdir(parents=True)
    for source, target in (
        ("model.ckpt", "model.ckpt"),
        ("model_config.yaml", "model_config.yaml"),
        ("mhr_stub.pt", "assets/mhr_model.pt"),
    ):
        shutil.copy(SAM3D_BODY_PARITY / source, body / target)
    return root


@pytest.fixture(scope="session")
def objects_weights_dir(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sam3/` plus `sam-3d-objects/checkpoints/` and `moge/model.pt`: a tiny random SAM 3D Objects release
    (pipeline.yaml, per-model yamls and .ckpt files) and MoGe, in the layouts the Hub has them."""
    from models.sam3d_objects.random_checkpoint import write_random_snapshot

    root = tmp_path_factory.mktemp("objects-weights")
    (root / "sam3").symlink_to(weights_dir / "sam3")
    write_random_snapshot(root, seed=0)
    return root


@pytest.fixture(scope="session")
def all_weights_dir(
    body_weights_dir: Path, objects_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Every model's weights in one directory (links): SAM 3 and SAM 3D Body, SAM 3D Objects and MoGe."""
    root = tmp_path_factory.mktemp("all-weights")
    for source, name in [
        (body_weights_dir, "sam3"),
        (body_weights_dir, "sam-3d-body-dinov3"),
        (objects_weights_dir, "sam-3d-objects"),
        (objects_weights_dir, "moge"),
    ]:
        (root / name).symlink_to(source / name)
    return root


@pytest.fixture(scope="session")
def empty_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("no-weights")


def png_b64(image: np.ndarray | Image.Image) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def noise_image(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
