"""The CLI: weights download/verify, configuration sources, and docs generated from the schemas."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from safetensors.torch import load_file, save_file

from server import config as config_module
from server.auth import ApiKeys, warn_if_exposed
from server.docs import parameters_table, render
from tests.conftest import REPO


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SAM3_SERVE_"))}
    return subprocess.run(
        [sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=120, env={**environment, **env}
    )


def test_verify_passes_on_a_complete_checkpoint(weights_dir):
    done = cli("weights", "verify", "--weights-dir", str(weights_dir))
    assert done.returncode == 0 and "sam3: ok: all keys match" in done.stdout


def test_verify_checks_the_sam3d_objects_release_and_moge(objects_weights_dir):
    done = cli("weights", "verify", "--weights-dir", str(objects_weights_dir))
    assert done.returncode == 0, done.stdout
    assert "sam-3d-objects: ok: all keys match" in done.stdout and "moge: ok: all keys match" in done.stdout


def test_verify_names_missing_and_unexpected_keys(weights_dir, tmp_path):
    shutil.copytree(weights_dir / "sam3", tmp_path / "sam3")
    state = load_file(tmp_path / "sam3" / "model.safetensors")
    del state["detector_model.dot_product_scoring.text_proj.weight"]
    state["detector_model.leftover.bias"] = state["tracker_model.no_memory_embedding"].clone()
    save_file(state, tmp_path / "sam3" / "model.safetensors")
    done = cli("weights", "verify", "--weights-dir", str(tmp_path))
    assert done.returncode == 1
    assert "detector_model.dot_product_scoring.text_proj.weight" in done.stdout
    assert "unexpected key(s): detector_model.leftover.bias" in done.stdout


def test_verify_reports_incomplete_and_absent_sets(weights_dir, tmp_path):
    assert (
        "not present (get it: sam3-serve weights download sam3)"
        in cli("weights", "verify", "--weights-dir", str(tmp_path)).stdout
    )
    (tmp_path / "sam3").mkdir()
    shutil.copy(weights_dir / "sam3" / "config.json", tmp_path / "sam3")
    done = cli("weights", "verify", "--weights-dir", str(tmp_path))
    assert done.returncode == 1 and "missing sam3/model.safetensors" in done.stdout


def test_download_explains_an_unreachable_hub(tmp_path):
    done = cli("weights", "download", "sam3", "--weights-dir", str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9")
    assert done.returncode == 1 and "Hugging Face Hub is unreachable" in done.stderr
    offline = cli("weights", "download", "sam3-image", "--weights-dir", str(tmp_path), HF_HUB_OFFLINE="1")
    assert offline.returncode == 1 and "sam3: could not download facebook/sam3" in offline.stderr
    assert cli("weights", "download", "sam9", "--weights-dir", str(tmp_path)).returncode == 2


class _GatedHub(BaseHTTPRequestHandler):
    """Answers like the Hub does for a gated repository the token has no access to."""

    def _refuse(self):
        body = b'{"error": "Access to model facebook/sam3 is restricted."}'
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model facebook/sam3 is restricted.")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = _refuse

    def log_message(self, *args):
        pass


def test_download_explains_a_gated_refusal(tmp_path):
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        done = cli(
            "weights",
            "download",
            "sam3",
            "--weights-dir",
            str(tmp_path),
            HF_ENDPOINT=f"http://127.0.0.1:{hub.server_address[1]}",
            HF_TOKEN="hf_not_granted",
        )
    finally:
        hub.shutdown()
    assert done.returncode == 1
    assert "gated" in done.stderr and "https://huggingface.co/facebook/sam3" in done.stderr


def _parse(*flags: str, **env: str) -> config_module.ServeConfig:
    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    return config_module.from_sources(parser.parse_args(list(flags)), environ=env)


def test_flags_override_environment_which_overrides_defaults(tmp_path):
    assert _parse().port == 8000
    assert _parse(SAM3_SERVE_PORT="9001").port == 9001
    assert _parse("--port", "9002", SAM3_SERVE_PORT="9001").port == 9002
    env = _parse(SAM3_SERVE_API_KEY="a, b", SAM3_SERVE_ALLOW_PRIVATE_URLS="true", SAM3_SERVE_MAX_BATCH_SIZE="8")
    assert env.api_key == ["a", "b"] and env.allow_private_urls is True and env.max_batch_size == 8
    keys = tmp_path / "keys"
    keys.write_text("# ops\nk1\n\nk2  # rotated monthly\n")
    assert _parse("--api-key", "k0", "--api-keys-file", str(keys)).api_keys() == ["k0", "k1", "k2"]
    with pytest.raises(ValueError):
        _parse("--max-batch-size", "0")


def test_api_keys_compare_every_key():
    keys = ApiKeys(["alpha", "beta"])
    assert keys.accepts("beta") and keys.accepts("alpha")
    assert not keys.accepts("gamma") and not keys.accepts(None) and not keys.accepts("")
    assert ApiKeys([]).accepts(None)


def test_exposed_without_a_key_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        warn_if_exposed("0.0.0.0", loopback=False, keys=ApiKeys([]))
        warn_if_exposed("127.0.0.1", loopback=True, keys=ApiKeys([]))
        warn_if_exposed("0.0.0.0", loopback=False, keys=ApiKeys(["k"]))
    assert len(caplog.records) == 1 and "NO API KEY" in caplog.records[0].getMessage()


def test_readme_tables_are_generated_from_the_schemas():
    readme = (REPO / "README.md").read_text()
    assert config_module.markdown_table() in readme
    assert parameters_table("sam3-image") in readme
    assert render(readme) == readme, "run python -m server.docs"
