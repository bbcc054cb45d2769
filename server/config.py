"""Server configuration: one pydantic model gives the CLI flags, the `SAM3_SERVE_*` environment
variables and the README table. Precedence: flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV_PREFIX = "SAM3_SERVE_"
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: Literal["127.0.0.1", "0.0.0.0", "::"] = Field(
        "127.0.0.1", description="Address to bind (LitServe binds only these)."
    )
    port: int = Field(8000, ge=1024, le=65535, description="Port to listen on.")
    weights_dir: Path = Field(Path("weights"), description="Directory of weight sets (see weights/README.md).")
    data_dir: Path = Field(Path("data"), description="Job database, inputs and output files.")
    jobs: str = Field(
        "sqlite",
        description="Job store: sqlite (DATA_DIR/jobs.sqlite3, one machine) or a redis:// URL that several "
        "replicas share (run Redis with appendonly yes).",
        pattern=r"^(sqlite|rediss?://.+)$",
    )
    artifacts: str | None = Field(
        None,
        description="Where output files go: a directory (default DATA_DIR/files; give a shared path to share it "
        "between replicas) or s3://BUCKET/PREFIX (served by presigned URLs).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of S3-compatible storage (MinIO, Ceph...); AWS credentials from the environment."
    )
    lease_seconds: float = Field(
        30, ge=2, description="Redis store: seconds a replica holds the jobs it runs; a dead replica's jobs move after."
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU.")
    devices: list[str] = Field(
        default_factory=list,
        description="Devices to run workers on, e.g. cuda:0 (repeat the flag; comma-separated in the variable). "
        "Default: every GPU with --device auto/cuda, else the CPU. cpu:N names extra CPU worker groups.",
    )
    placement: list[str] = Field(
        default_factory=list,
        description="MODEL=DEVICE[+DEVICE...]: load MODEL only there, e.g. sam3-image=all, sam-3d-body=cuda:1 "
        "(repeat the flag). Default: every model on every device.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model precision. auto: bfloat16 on CUDA, float32 on CPU."
    )
    public_url: str | None = Field(
        None, description="Base of the absolute URLs in responses (default: the scheme and host of each request)."
    )
    api_key: list[str] = Field(
        default_factory=list, description="Accepted API key (repeat the flag; comma-separated in the variable)."
    )
    api_keys_file: Path | None = Field(None, description="File of accepted API keys, one per line ('#' comments).")
    max_batch_size: int = Field(4, ge=1, le=64, description="Most jobs one forward pass batches together.")
    batch_timeout: float = Field(0.05, gt=0, le=5, description="Seconds a worker waits to fill a batch.")
    workers_per_device: int = Field(1, ge=1, le=16, description="Inference worker processes per device.")
    api_servers: int = Field(1, ge=1, le=32, description="HTTP front-end processes (they share the job store).")
    max_queue: int = Field(64, ge=1, description="Most unfinished jobs; submits beyond get 429 with Retry-After.")
    job_timeout: float = Field(600, gt=0, description="Seconds from submit after which an unfinished job FAILS.")
    retention: float = Field(3600, gt=0, description="Seconds a job and its files are kept after submission.")
    drain_timeout: float = Field(120, ge=0, description="On SIGTERM, seconds to let running jobs finish.")
    embedding_cache_size: int = Field(16, ge=0, description="Images whose SAM 3 features stay cached per worker.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Larger images are refused (decompression bombs).")
    max_request_bytes: int = Field(64 * 2**20, ge=1024, description="Largest request body and image download.")
    url_timeout: float = Field(20, gt=0, description="Seconds to download an image URL.")
    allow_private_urls: bool = Field(
        False, description="Allow image URLs on loopback, private and link-local addresses."
    )
    body_variant: Literal["dinov3", "vith"] = Field(
        "dinov3", description="SAM 3D Body release served as sam-3d-body (weight set sam-3d-body-VARIANT)."
    )
    body_inference_mode: Literal["full", "body"] = Field(
        "full", description="sam-3d-body default: full refines both hands (slower), body runs one body pass."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text, or one JSON object per line (ts, level, logger, message, pid, request_id) "
        "from every process.",
    )
    metrics_require_key: bool = Field(
        False, description="Require the API key on /metrics too (open by default, like /health, for scrapers)."
    )
    ssl_certfile: Path | None = Field(
        None, description="TLS certificate (PEM) to serve HTTPS, as fal-client requires; give --ssl-keyfile too."
    )
    ssl_keyfile: Path | None = Field(None, description="TLS private key (PEM) of --ssl-certfile.")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServeConfig:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile: give both (HTTPS) or neither (HTTP)")
        return self

    @property
    def jobs_db(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    def api_keys(self) -> list[str]:
        keys = list(self.api_key)
        if self.api_keys_file:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.append(line)
        return keys

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are left to `from_sources` so that env vars can fill them."""
    for name, field in ServeConfig.model_fields.items():
        help_text = f"{field.description} [env {env_name(name)}]"
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(_flag(name), action="store_true", default=None, help=help_text)
        elif get_origin(annotation) is list:
            parser.add_argument(_flag(name), action="append", default=None, help=help_text)
        elif get_origin(annotation) is Literal:
            parser.add_argument(_flag(name), choices=get_args(annotation), default=None, help=help_text)
        else:
            parser.add_argument(_flag(name), default=None, help=help_text)


def from_sources(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None) -> ServeConfig:
    """Build the config from parsed flags, then `SAM3_SERVE_*` variables, then defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, field in ServeConfig.model_fields.items():
        flag_value = getattr(args, name, None) if args is not None else None
        if flag_value is not None:
            values[name] = flag_value
        elif env_name(name) in environ:
            raw = environ[env_name(name)]
            if get_origin(field.annotation) is list:
                values[name] = [v.strip() for v in raw.split(",") if v.strip()]
            else:
                values[name] = raw
    return ServeConfig.model_validate(values)


def markdown_table() -> str:
    """The configuration table of the README."""
    rows = ["| Flag | Environment variable | Default | Description |", "| --- | --- | --- | --- |"]
    for name, field in ServeConfig.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        description = field.description
        if get_origin(field.annotation) is Literal:
            description += " One of " + ", ".join(f"`{c}`" for c in get_args(field.annotation)) + "."
        rows.append(f"| `{_flag(name)}` | `{env_name(name)}` | `{default}` | {description} |")
    return "\n".join(rows)
