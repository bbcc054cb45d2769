"""The job and artifact stores the configuration asks for, built the same way in every process."""

from __future__ import annotations

from pathlib import Path

from server.artifacts import ArtifactStore, S3ArtifactStore
from server.config import ServeConfig
from server.jobs import JobStore, SqliteJobStore


def open_job_store(config: ServeConfig, replica: str) -> JobStore:
    """SQLite in the data dir, or the Redis store shared by replicas (`replica` names this server)."""
    if config.jobs == "sqlite":
        return SqliteJobStore(config.jobs_db, config.data_dir / "inputs")
    from server.redis_store import RedisJobStore

    return RedisJobStore(config.jobs, replica, lease_seconds=config.lease_seconds)


def open_artifact_store(config: ServeConfig) -> ArtifactStore | S3ArtifactStore:
    """A directory (DATA_DIR/files by default, or a path shared by replicas), or an s3:// bucket and prefix."""
    if config.artifacts and config.artifacts.startswith("s3://"):
        return S3ArtifactStore(config.artifacts, config.s3_endpoint_url)
    return ArtifactStore(Path(config.artifacts) if config.artifacts else config.data_dir / "files")
