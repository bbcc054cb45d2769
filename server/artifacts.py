"""Output files of jobs on local disk, under an unguessable token per job.

A job's files live in `<root>/<token>/<name>`; the server serves them at `/files/<token>/<name>`
behind the same API-key check as every other route, and deletes them with the job.
"""

from __future__ import annotations

import mimetypes
import os
import re
import secrets
import shutil
from pathlib import Path

TOKEN = re.compile(r"^[A-Za-z0-9_-]{22,64}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONTENT_TYPES = {".glb": "model/gltf-binary", ".ply": "application/octet-stream", ".zip": "application/zip"}


def new_token() -> str:
    return secrets.token_urlsafe(24)


def content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, token: str, name: str, content: bytes) -> int:
        """Write one file atomically (readers never see a partial file); returns its size."""
        if not (TOKEN.match(token) and FILE_NAME.match(name)):
            raise ValueError(f"invalid artifact name {token}/{name}")
        folder = self.root / token
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{name}.partial"
        partial.write_bytes(content)
        os.replace(partial, folder / name)
        return len(content)

    def path(self, token: str, name: str) -> Path | None:
        """The file's path, or None for a malformed or unknown name (no path ever leaves the root)."""
        if not (TOKEN.match(token) and FILE_NAME.match(name)):
            return None
        path = self.root / token / name
        return path if path.is_file() else None

    def delete(self, token: str) -> None:
        if TOKEN.match(token):
            shutil.rmtree(self.root / token, ignore_errors=True)
