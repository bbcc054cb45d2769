"""sam-3d-body benchmark: `python -m benchmarks.sam3d_body`.

At the released size (DINOv3 ViT-H+ backbone, 6-layer decoder; random weights unless
--weights-dir is given) it reports, as ratios within one run since these machines are noisy:
  (a) seconds per person, "body" and "full" mode, and the process's peak memory;
  (b) 4 people in one batch / 4 single-person calls ("body" mode);
  (c) one person through the server (v1 sync, mask prompt) / the same model call in-process.
The body model is the parity fixture's TorchScript MHR stand-in: the real MHR (LOD1 with pose
correctives) costs more per call; it runs once per decoder layer. Results go to
benchmarks/results/sam3d_body.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import RESULTS, SHARED, b64, device_name, start, worker_peak_rss

FIXTURES = SHARED / "fixtures" / "sam3d_body"
HEIGHT, WIDTH = 720, 960
BOXES = np.array([[60, 80, 260, 700], [280, 60, 480, 690], [500, 90, 700, 710], [720, 70, 920, 700]], np.float32)


def release_config() -> dict:
    config = json.loads((FIXTURES / "manifest_dinov3.json").read_text())["_about"]["config"]
    return config


def write_weights(root: Path) -> Path:
    from models.sam3.random_checkpoint import write_random_checkpoint
    from models.sam3d_body.random_checkpoint import write_random_release

    write_random_checkpoint(root / "sam3", SHARED / "fixtures" / "sam3" / "bpe_simple_vocab_16e6.txt.gz", size="tiny")
    parity = FIXTURES / "parity_a"
    write_random_release(root / "sam-3d-body-dinov3", release_config(), parity / "model.ckpt", parity / "mhr_stub.pt")
    return root


def picture() -> np.ndarray:
    return (np.random.default_rng(0).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-dir", type=Path, help="use real weights (default: random, released size)")
    parser.add_argument("--repeats", type=int, default=3, help="calls per median")
    args = parser.parse_args()

    import torch

    from models.sam3d_body.checkpoint import load_sam3d_body
    from models.sam3d_body.predictor import BodyRequest, Sam3DBodyPredictor

    with tempfile.TemporaryDirectory(prefix="sam3d-body-bench-") as tmp:
        work = Path(tmp)
        weights = args.weights_dir or write_weights(work / "weights")
        checkpoint = f"real weights in {args.weights_dir}" if args.weights_dir else "random, released dinov3 config"
        folder = weights / "sam-3d-body-dinov3"
        cuda = torch.cuda.is_available()
        model = load_sam3d_body(
            folder, "cuda" if cuda else "cpu", backbone_dtype=torch.bfloat16 if cuda else torch.float32
        )
        predictor = Sam3DBodyPredictor(model)
        params = sum(p.numel() for p in model.parameters())
        image = picture()
        results: dict = {"device": device_name(), "checkpoint": checkpoint, "parameters": params}
        print(results, flush=True)

        def one(mode: str) -> None:
            predictor.predict([BodyRequest(image, BOXES[:1])], mode=mode)

        body_s = timed(lambda: one("body"), args.repeats)
        full_s = timed(lambda: one("full"), max(1, args.repeats - 2))
        results["a_per_person"] = {
            "body_s": round(body_s, 3),
            "full_s": round(full_s, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }
        if cuda:
            results["a_per_person"]["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print("(a)", results["a_per_person"], flush=True)

        batch = timed(lambda: predictor.predict([BodyRequest(image, BOXES)], mode="body"), args.repeats)
        singles = timed(lambda: [predictor.predict([BodyRequest(image, b[None])], mode="body") for b in BOXES], 1)
        results["b_batch"] = {"batch_of_4_s": round(batch, 3), "four_single_s": round(singles, 3)}
        results["b_batch"]["ratio"] = round(batch / singles, 3)
        print("(b)", results["b_batch"], flush=True)

        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        x1, y1, x2, y2 = BOXES[0].astype(int)
        mask[y1:y2, x1:x2] = 255
        body = {"image": b64(image), "mask": b64(mask), "inference_mode": "body"}
        request = BodyRequest(image, BOXES[:1], masks=(mask[None] > 0).astype(np.uint8))
        server = start(weights, work / "data", "--max-batch-size", "1")
        through_server, in_process = [], []
        try:
            for _ in range(args.repeats + 1):  # interleaved, the first pair is a warm-up
                begin = time.perf_counter()
                httpx.post(f"{server.url}/v1/sam-3d-body", json=body, timeout=600).raise_for_status()
                through_server.append(time.perf_counter() - begin)
                begin = time.perf_counter()
                predictor.predict([request], mode="body")
                in_process.append(time.perf_counter() - begin)
            peaks = worker_peak_rss(server)
        finally:
            server.terminate()
        server_s, local_s = statistics.median(through_server[1:]), statistics.median(in_process[1:])
        results["c_server"] = {
            "server_s": round(server_s, 3),
            "model_call_s": round(local_s, 3),
            "ratio": round(server_s / local_s, 3),
            "worker_peak_rss_gib": peaks,
        }
        print("(c)", results["c_server"], flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sam3d_body.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "sam3d_body.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    a, b, c = results["a_per_person"], results["b_batch"], results["c_server"]
    return (
        "\n".join(
            [
                f"Device: {results['device']}  ",
                f"Checkpoint: {results['checkpoint']} ({results['parameters'] / 1e6:.1f} M parameters, MHR excluded)",
                "",
                "| Measure | Value | Ratio |",
                "| --- | --- | --- |",
                f"| (a) seconds per person, body mode / full mode | {a['body_s']} s / {a['full_s']} s "
                f"| {round(a['full_s'] / a['body_s'], 2)} |",
                f"| (a) peak memory of the benchmark process | {a['peak_rss_gib']} GiB | |",
                f"| (b) 4 people in one call / 4 single-person calls (body) "
                f"| {b['batch_of_4_s']} s / {b['four_single_s']} s | {b['ratio']} |",
                f"| (c) v1 request through the server / model call in-process (body, 1 person) "
                f"| {c['server_s']} s / {c['model_call_s']} s | {c['ratio']} |",
                f"| (c) server worker peak RSS | {c['worker_peak_rss_gib']} GiB | |",
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
