"""sam3-image serving benchmark: `python -m benchmarks.sam3_image` (or `make bench`).

Reports ratios taken within one run, since these machines are noisy:
  (a) v1 sync latency through the server / the same work called in-process (batch 1);
  (b) images/s at concurrency 8 with dynamic batching / with max_batch_size=1;
  (c) latency of a second prompt on an image / of the first (embedding cache);
  (d) peak RSS of each worker process.
Without --weights-dir it writes the `mid` random checkpoint: every part of SAM 3 at a quarter of
its released width, at the released depth and 1008 px resolution. Results go to
benchmarks/results/sam3_image.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import RESULTS, SHARED, b64, device_name, start, worker_peak_rss
from tests.server_process import ServerProcess

BPE = SHARED / "fixtures" / "sam3" / "bpe_simple_vocab_16e6.txt.gz"


def images(count: int, seed: int) -> list[np.ndarray]:
    """Distinct 1024x768 photos-sized inputs, so that no request hits another's cached embedding."""
    rng = np.random.default_rng(seed)
    return [(rng.random((768, 1024, 3)) * 255).astype(np.uint8) for _ in range(count)]


def v1(server: ServerProcess, body: dict) -> float:
    start = time.perf_counter()
    response = httpx.post(f"{server.url}/v1/sam3-image", json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start


def latency_vs_in_process(weights: Path, work: Path, repeats: int) -> dict:
    """(a): the same request through the HTTP server and called in the benchmark's own process.

    The two are interleaved request by request (the server idles while the in-process call runs),
    so that this machine's speed drifting over a minute cancels out of the ratio.
    """
    import torch

    from models.sam3 import Sam3Predictor, load_sam3
    from pipeline import sam3_image
    from pipeline.schemas import Sam3ImageParams
    from pipeline.task import TaskInput

    predictor = Sam3Predictor(load_sam3(weights / "sam3", dtype=torch.float32), cache_size=0, max_vit_batch=1)
    params = Sam3ImageParams(text_prompt="a cat")
    server = start(weights, work / "a", "--max-batch-size", "1", "--embedding-cache-size", "0")
    through_server, in_process = [], []
    try:
        for i, picture in enumerate(images(repeats + 1, seed=1)):
            through_server.append(v1(server, {"image": b64(picture), "text_prompt": "a cat"}))
            start_time = time.perf_counter()
            sam3_image.run(predictor, [TaskInput(picture, f"bench-{i}", params, lambda name, content, kind: None)])
            in_process.append(time.perf_counter() - start_time)
    finally:
        server.terminate()
    server_s, local_s = statistics.median(through_server[1:]), statistics.median(in_process[1:])
    return {"server_s": round(server_s, 3), "in_process_s": round(local_s, 3), "ratio": round(server_s / local_s, 3)}


def throughput(weights: Path, work: Path, requests: int, max_batch_size: int) -> dict:
    """(b): images/s with 8 clients at once; returns the run's rate and the workers' peak RSS."""
    bodies = [{"image": b64(p), "text_prompt": "a cat"} for p in images(requests, seed=2)]
    server = start(
        weights, work / f"b{max_batch_size}", "--max-batch-size", str(max_batch_size), "--embedding-cache-size", "0"
    )
    try:
        v1(server, bodies[0])  # warm-up
        begin = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda body: v1(server, body), bodies))
        elapsed = time.perf_counter() - begin
        peaks = worker_peak_rss(server)
    finally:
        server.terminate()
    return {"images_per_s": round(requests / elapsed, 4), "seconds": round(elapsed, 2), "worker_peak_rss_gib": peaks}


def second_prompt(weights: Path, work: Path, repeats: int) -> dict:
    """(c): a first prompt embeds the image; a second, different prompt reuses the cached embedding."""
    server = start(weights, work / "c")
    firsts, seconds = [], []
    try:
        for picture in images(repeats + 1, seed=3):
            image = b64(picture)
            firsts.append(v1(server, {"image": image, "text_prompt": "a cat"}))
            seconds.append(v1(server, {"image": image, "text_prompt": "a dog"}))
    finally:
        server.terminate()
    first, second = statistics.median(firsts[1:]), statistics.median(seconds[1:])
    return {"first_s": round(first, 3), "second_s": round(second, 3), "ratio": round(second / first, 3)}


def markdown(results: dict) -> str:
    a, b, c = results["a_latency"], results["b_throughput"], results["c_second_prompt"]
    batched, unbatched = b["batched"], b["unbatched"]
    rows = [
        f"Device: {results['device']}  ",
        f"Checkpoint: {results['checkpoint']}",
        "",
        "| Measure | Value | Ratio | Target |",
        "| --- | --- | --- | --- |",
        f"| (a) v1 sync latency, server / in-process (batch 1) "
        f"| {a['server_s']} s / {a['in_process_s']} s | {a['ratio']} | <= 1.10 |",
        f"| (b) images/s at concurrency 8, dynamic batching (max {batched['max_batch_size']}) / max_batch_size=1 "
        f"| {batched['images_per_s']} / {unbatched['images_per_s']} | {b['ratio']} | >= 1.3 |",
        f"| (c) second prompt on an image / first prompt "
        f"| {c['second_s']} s / {c['first_s']} s | {c['ratio']} | <= 0.2 |",
        f"| (d) peak RSS per worker (batched run) | {batched['worker_peak_rss_gib']} GiB | | |",
    ]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-dir", type=Path, help="use real weights (default: write the mid random checkpoint)")
    parser.add_argument("--repeats", type=int, default=5, help="requests per latency median")
    parser.add_argument("--requests", type=int, default=16, help="requests per throughput run")
    parser.add_argument("--max-batch-size", type=int, default=8, help="batch size of the batched throughput run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sam3-bench-") as tmp:
        work = Path(tmp)
        weights = args.weights_dir
        checkpoint = (
            f"real weights in {weights}" if weights else "random `mid` config (quarter width, full depth, 1008 px)"
        )
        if weights is None:
            from models.sam3.random_checkpoint import write_random_checkpoint

            weights = work / "weights"
            write_random_checkpoint(weights / "sam3", BPE, size="mid")
        print(f"device: {device_name()}\ncheckpoint: {checkpoint}", flush=True)
        results = {"device": device_name(), "checkpoint": checkpoint}
        results["a_latency"] = latency_vs_in_process(weights, work, args.repeats)
        print("(a)", results["a_latency"], flush=True)
        batched = throughput(weights, work, args.requests, args.max_batch_size)
        unbatched = throughput(weights, work, args.requests, 1)
        results["b_throughput"] = {
            "batched": {**batched, "max_batch_size": args.max_batch_size},
            "unbatched": {**unbatched, "max_batch_size": 1},
            "ratio": round(batched["images_per_s"] / unbatched["images_per_s"], 3),
        }
        print("(b)", results["b_throughput"], flush=True)
        results["c_second_prompt"] = second_prompt(weights, work, args.repeats)
        print("(c)", results["c_second_prompt"], flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sam3_image.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "sam3_image.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
