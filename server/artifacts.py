"""Output files of jobs, under an unguessable token per job, deleted with the job.

- `ArtifactStore`: a directory (local, or a path every replica mounts): `<root>/<token>/<name>`,
  served by the server at `/files/<token>/<name>` behind the same API-key check as every route.
- `S3ArtifactStore`: S3-compatible object storage: `<prefix>/<token>/<name>`, handed out as
  presigned URLs valid until the job expires, so clients fetch files from the storage directly.
"""

from __future__ import annotations

import mimetypes
import os
import re
import secrets
import shutil
import time
from pathlib import Path

TOKEN = re.compile(r"^[A-Za-z0-9_-]{22,64}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONTENT_TYPES = {".glb": "model/gltf-binary", ".ply": "application/octet-stream", ".zip": "application/zip"}


def new_token() -> str:
    return secrets.token_urlsafe(24)


def content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def _valid(token: str, name: str) -> bool:
    return bool(TOKEN.match(token) and FILE_NAME.match(name))


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, token: str, name: str, content: bytes) -> int:
        """Write one file atomically (readers never see a partial file); returns its size."""
        if not _valid(token, name):
            raise ValueError(f"invalid artifact name {token}/{name}")
        folder = self.root / token
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{name}.partial"
        partial.write_bytes(content)
        os.replace(partial, folder / name)
        return len(content)

    def path(self, token: str, name: str) -> Path | None:
        """The file's path, or None for a malformed or unknown name (no path ever leaves the root)."""
        if not _valid(token, name):
            return None
        path = self.root / token / name
        return path if path.is_file() else None

    def url(self, base: str, token: str, name: str, expires_at: float) -> str:
        return f"{base}/files/{token}/{name}"

    def read(self, token: str, name: str) -> bytes | None:
        path = self.path(token, name)
        return path.read_bytes() if path else None

    def delete(self, token: str) -> None:
        if TOKEN.match(token):
            shutil.rmtree(self.root / token, ignore_errors=True)


class S3ArtifactStore:
    """Files in an S3 bucket (AWS, MinIO, Ceph...), credentials from the usual AWS environment."""

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        import boto3

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, token: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, token, name) if p)

    def save(self, token: str, name: str, content: bytes) -> int:
        if not _valid(token, name):
            raise ValueError(f"invalid artifact name {token}/{name}")
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(token, name), Body=content, ContentType=content_type(name)
        )
        return len(content)

    def path(self, token: str, name: str) -> None:
        """No local path: files are served by the storage (see `url`)."""
        return None

    def url(self, base: str, token: str, name: str, expires_at: float) -> str:
        """A presigned GET URL valid until the job expires (S3 allows at most 7 days)."""
        seconds = int(min(max(expires_at - time.time(), 60), 7 * 24 * 3600))
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(token, name)}, ExpiresIn=seconds
        )

    def read(self, token: str, name: str) -> bytes | None:
        if not _valid(token, name):
            return None
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(token, name))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def delete(self, token: str) -> None:
        if not TOKEN.match(token):
            return
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(token, "") + "/")
        keys = [{"Key": item["Key"]} for item in listed.get("Contents", [])]
        if keys:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
