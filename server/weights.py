"""Weight sets: the files each needs (`weights/manifest.json`), Hub download, and verification."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class WeightSet:
    name: str  # directory under the weights dir
    repo: str  # Hugging Face Hub repository it is a snapshot of
    description: str
    gated: bool
    size: str
    files: tuple[str, ...]

    def missing(self, weights_dir: Path) -> list[str]:
        return [f"{self.name}/{f}" for f in self.files if not (weights_dir / self.name / f).is_file()]

    @property
    def download_command(self) -> str:
        return f"sam3-serve weights download {self.name}"


def load_manifest() -> dict[str, WeightSet]:
    raw = json.loads(resources.files("weights").joinpath("manifest.json").read_text())
    return {name: WeightSet(name=name, **{**entry, "files": tuple(entry["files"])}) for name, entry in raw.items()}


MANIFEST = load_manifest()


class DownloadError(RuntimeError):
    """The Hub refused or could not be reached; the message says what to do."""


def download(name: str, weights_dir: Path, token: str | None = None) -> Path:
    """Snapshot the set's files from the Hub into `weights_dir/name` (progress bars on the terminal)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    entry = MANIFEST[name]
    target = weights_dir / name
    token = token or os.environ.get("HF_TOKEN")
    try:
        snapshot_download(entry.repo, local_dir=target, allow_patterns=list(entry.files), token=token)
    except GatedRepoError:
        raise DownloadError(
            f"{entry.repo} is gated and refused this token. Request access at https://huggingface.co/{entry.repo}, "
            "then set HF_TOKEN to a token of the account that was granted access."
        ) from None
    except RepositoryNotFoundError:
        hint = "set HF_TOKEN (the repository is gated)" if not token else "check that HF_TOKEN has access"
        raise DownloadError(f"{entry.repo} was not found or is not visible: {hint}.") from None
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as exc:
        raise DownloadError(
            f"could not download {entry.repo}: the Hugging Face Hub is unreachable (offline, proxy or firewall?). "
            f"Copy a snapshot of {entry.repo} into {target} instead. ({type(exc).__name__}: {exc})"
        ) from None
    missing = entry.missing(weights_dir)
    if missing:
        raise DownloadError(f"{entry.repo} downloaded, but these files are still missing: {', '.join(missing)}")
    return target


@dataclass
class VerifyResult:
    name: str
    ok: bool
    message: str


def verify(weights_dir: Path) -> list[VerifyResult]:
    """Load every present weight set and report missing/unexpected keys."""
    from models.sam3 import CheckpointError, load_sam3
    from models.sam3d_body.checkpoint import verify_sam3d_body
    from models.sam3d_objects.checkpoint import verify_moge, verify_sam3d_objects

    loaders = {
        "sam3": lambda folder: load_sam3(folder).report.describe(),
        "sam-3d-body-dinov3": verify_sam3d_body,
        "sam-3d-body-vith": verify_sam3d_body,
        "sam-3d-objects": lambda folder: verify_sam3d_objects(folder / "checkpoints"),
        "moge": lambda folder: verify_moge(folder / "model.pt"),
    }
    results = []
    for name, entry in MANIFEST.items():
        missing = entry.missing(weights_dir)
        if len(missing) == len(entry.files):
            results.append(VerifyResult(name, True, f"not present (get it: {entry.download_command})"))
            continue
        if missing:
            results.append(VerifyResult(name, False, f"incomplete, missing {', '.join(missing)}"))
            continue
        try:
            results.append(VerifyResult(name, True, loaders[name](weights_dir / name)))
        except CheckpointError as exc:
            results.append(VerifyResult(name, False, str(exc)))
        except Exception as exc:  # a corrupt file: report it, keep verifying the others
            results.append(VerifyResult(name, False, f"cannot load: {type(exc).__name__}: {exc}"))
    return results
