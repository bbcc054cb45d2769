"""`sam3-serve bench`: a load generator for any Segmind-compatible endpoint, this server or Segmind's.

Each request is timed end to end from the client. In v2 mode: submit, poll the status URL until
COMPLETED or FAILED, then fetch the result. The poll interval starts at 20 ms and grows 1.5x per
poll, but never beyond 10% of the time since submission nor beyond 1 s: a fast job is seen
finishing within milliseconds, a slow one costs few polls, and the poll period adds at most 10%
to any latency. The interval in force when each job finished (the resolution) is reported.
In v1 mode: one synchronous POST, then the v1 poll URL for the server's metrics. The run stops
starting requests after `--requests` or `--duration`, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

POLL_INITIAL_S = 0.02
POLL_FACTOR = 1.5
POLL_MAX_S = 1.0
POLL_MAX_FRACTION = 0.1  # of the time elapsed since submission
PERCENTILES = (50, 90, 99)


@dataclass
class Sample:
    """One measured request."""

    started: float  # seconds after the measured phase began
    latency: float | None = None  # end to end, None when it failed
    error: str | None = None  # HTTP status ("422" for a FAILED job), "timeout" or "transport"
    message: str | None = None
    metrics: dict = field(default_factory=dict)  # the server's `metrics`
    polls: int = 0
    final_interval: float = 0.0


@dataclass
class Target:
    base_url: str
    model: str
    body: dict
    headers: dict
    mode: str
    timeout: float

    @property
    def submit_url(self) -> str:
        return f"{self.base_url}/{self.mode}/{self.model}"


def base_url(url: str) -> str:
    """Accept the server root or an SDK-style base ending in /v1 or /v2."""
    url = url.rstrip("/")
    for suffix in ("/v1", "/v2"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def parse_param(text: str) -> tuple[str, object]:
    """`name=value`: numbers, booleans and null are typed; anything else (lists too) stays a string,
    as Segmind documents them ("[[300, 400]]")."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--param expects name=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return name, raw
    return name, value if value is None or isinstance(value, (bool, int, float)) else raw


def image_value(path_or_url: str) -> str:
    if path_or_url.startswith(("http://", "https://", "data:")):
        return path_or_url
    return base64.b64encode(Path(path_or_url).read_bytes()).decode()


def _error(response: httpx.Response) -> tuple[str, str]:
    try:
        message = response.json().get("error") or response.text
    except (ValueError, AttributeError):
        message = response.text
    return str(response.status_code), str(message)[:300]


async def run_v2(client: httpx.AsyncClient, target: Target, sample: Sample, start: float) -> None:
    submitted = await client.post(target.submit_url, json=target.body, headers=target.headers)
    if submitted.status_code // 100 != 2:
        sample.error, sample.message = _error(submitted)
        return
    urls = submitted.json()
    interval = POLL_INITIAL_S
    while True:
        status = await client.get(urls["status_url"], headers=target.headers)
        sample.polls += 1
        is_json = status.headers.get("content-type", "").startswith("application/json")
        state = status.json().get("status") if is_json else None
        if state == "FAILED":
            sample.error, sample.message = str(status.status_code), status.json().get("error")
            return
        if state == "COMPLETED":
            result = await client.get(urls["response_url"], headers=target.headers)
            if result.status_code != 200:
                sample.error, sample.message = _error(result)
                return
            sample.latency = time.perf_counter() - start
            sample.metrics = result.json().get("metrics", {})
            sample.final_interval = interval
            return
        if status.status_code // 100 != 2:
            sample.error, sample.message = _error(status)
            return
        await asyncio.sleep(interval)
        elapsed = time.perf_counter() - start
        interval = min(interval * POLL_FACTOR, POLL_MAX_S, max(POLL_INITIAL_S, POLL_MAX_FRACTION * elapsed))


async def run_v1(client: httpx.AsyncClient, target: Target, sample: Sample, start: float) -> None:
    response = await client.post(target.submit_url, json=target.body, headers=target.headers)
    if response.status_code != 200:
        sample.error, sample.message = _error(response)
        return
    sample.latency = time.perf_counter() - start
    request_id = response.headers.get("x-request-id")
    sample.metrics = {"inference_time": float(response.headers.get("x-generation-time", "nan"))}
    if request_id:  # the poll URL carries the full metrics; not part of the latency
        details = await client.get(f"{target.base_url}/v1/requests/{request_id}", headers=target.headers)
        if details.status_code == 200:
            sample.metrics = details.json().get("metrics", sample.metrics)


async def measure(client: httpx.AsyncClient, target: Target, phase_start: float) -> Sample:
    start = time.perf_counter()
    sample = Sample(started=start - phase_start)
    runner = run_v2 if target.mode == "v2" else run_v1
    try:
        await asyncio.wait_for(runner(client, target, sample, start), timeout=target.timeout)
    except TimeoutError:
        sample.latency, sample.error, sample.message = None, "timeout", f"no answer within {target.timeout:g} s"
    except httpx.HTTPError as exc:
        sample.latency, sample.error, sample.message = None, "transport", f"{type(exc).__name__}: {exc}"
    return sample


async def run_load(target: Target, requests: int, concurrency: int, duration: float, warmup: int) -> tuple[list, float]:
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=target.timeout, limits=limits) as client:
        for _ in range(warmup):
            await measure(client, target, time.perf_counter())
        samples: list[Sample] = []
        started = 0
        phase_start = time.perf_counter()
        progress = tqdm(total=requests, unit="req", desc=f"{target.mode} {target.model}", file=sys.stderr, disable=None)

        async def client_loop() -> None:
            nonlocal started
            while started < requests and time.perf_counter() - phase_start < duration:
                started += 1
                samples.append(await measure(client, target, phase_start))
                progress.update(1)
                progress.set_postfix(errors=sum(s.error is not None for s in samples))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        progress.close()
        return samples, time.perf_counter() - phase_start


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    array = np.asarray(values, dtype=float)
    out = {f"p{p}": round(float(np.percentile(array, p)), 4) for p in PERCENTILES}
    out.update(mean=round(float(array.mean()), 4), min=round(float(array.min()), 4), max=round(float(array.max()), 4))
    return out


def summarize(samples: list[Sample], wall: float, target: Target, limits: dict) -> dict:
    ok = [s for s in samples if s.error is None]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for s in samples:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
            examples.setdefault(s.error, s.message or "")
    stages: dict[str, list[float]] = {}
    for s in ok:
        for stage, seconds in s.metrics.get("stages", {}).items():
            stages.setdefault(stage, []).append(seconds)

    def metric(name: str) -> list[float]:
        return [s.metrics[name] for s in ok if isinstance(s.metrics.get(name), (int, float))]

    report = {
        "target": {"base_url": target.base_url, "model": target.model, "mode": target.mode, **limits},
        "requests": {"sent": len(samples), "ok": len(ok), "errors": len(samples) - len(ok)},
        "errors": errors,
        "error_examples": examples,
        "wall_time_s": round(wall, 3),
        "throughput_rps": round(len(ok) / wall, 4) if wall > 0 else 0.0,
        "latency_s": _stats([s.latency for s in ok]),
        "server": {
            "queue_time_s": _stats(metric("queue_time")),
            "inference_time_s": _stats(metric("inference_time")),
            "stages_s": {stage: _stats(values) for stage, values in stages.items()},
            "batch_size": _stats(metric("batch_size")),
        },
        "samples": [{"t": round(s.started, 4), "latency_s": s.latency, "error": s.error} for s in samples],
    }
    if target.mode == "v2":
        report["polling"] = {
            "initial_s": POLL_INITIAL_S,
            "factor": POLL_FACTOR,
            "max_s": POLL_MAX_S,
            "max_fraction_of_elapsed": POLL_MAX_FRACTION,
            "mean_polls": round(float(np.mean([s.polls for s in ok])), 2) if ok else 0.0,
            "mean_final_interval_s": round(float(np.mean([s.final_interval for s in ok])), 4) if ok else 0.0,
        }
    return report


def table(report: dict) -> str:
    def row(name: str, stats: dict) -> str:
        cells = [f"{stats.get(k, float('nan')):>9.3f}" for k in ("p50", "p90", "p99", "max", "mean")]
        return f"  {name:<22}" + "".join(cells)

    target, requests = report["target"], report["requests"]
    lines = [
        f"{target['mode']} {target['model']} at {target['base_url']}: {requests['sent']} requests, "
        f"{requests['ok']} ok, concurrency {target['concurrency']}, {report['wall_time_s']} s",
        f"  throughput {report['throughput_rps']} requests/s",
        f"  {'seconds':<22}" + "".join(f"{k:>9}" for k in ("p50", "p90", "p99", "max", "mean")),
        row("latency (end to end)", report["latency_s"]),
        row("server queue_time", report["server"]["queue_time_s"]),
        row("server inference_time", report["server"]["inference_time_s"]),
    ]
    lines += [row(f"  stage {stage}", stats) for stage, stats in report["server"]["stages_s"].items()]
    if "polling" in report:
        polling = report["polling"]
        lines.append(
            f"  polling: {polling['mean_polls']} polls per request, final interval {polling['mean_final_interval_s']} s"
            f" (starts {polling['initial_s']} s, x{polling['factor']}, at most {polling['max_s']} s"
            f" and {polling['max_fraction_of_elapsed']:.0%} of the time elapsed)"
        )
    for code, count in sorted(report["errors"].items()):
        lines.append(f"  errors {code}: {count}  e.g. {report['error_examples'][code]}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Latency distribution and latency over time, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in report["samples"] if s["error"] is None]
    failed = [s for s in report["samples"] if s["error"] is not None]
    figure, (histogram, timeline) = plt.subplots(1, 2, figsize=(12, 4.5))
    latencies = [s["latency_s"] for s in ok]
    histogram.hist(latencies, bins=min(40, max(5, len(latencies) // 2)), color="#3b7dd8")
    for p in PERCENTILES:
        if latencies:
            value = report["latency_s"][f"p{p}"]
            histogram.axvline(value, linestyle="--", color="#444")
            histogram.annotate(f"p{p}", (value, histogram.get_ylim()[1] * 0.9), rotation=90, fontsize=8)
    histogram.set(title="Latency distribution", xlabel="seconds", ylabel="requests")
    timeline.scatter([s["t"] for s in ok], latencies, s=12, color="#3b7dd8", label="ok")
    if failed:
        timeline.scatter([s["t"] for s in failed], [0] * len(failed), marker="x", color="#d62728", label="error")
    timeline.set(title="Latency over time", xlabel="request start (s)", ylabel="latency (s)")
    timeline.legend(loc="best")
    target = report["target"]
    figure.suptitle(f"{target['mode']} {target['model']}, concurrency {target['concurrency']}: {target['base_url']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 or https://api.segmind.com"
    )
    parser.add_argument("--api-key", help="sent as x-api-key")
    parser.add_argument("--model", required=True, help="model slug, e.g. sam3-image")
    parser.add_argument("--image", required=True, help="image file (sent as base64) or http(s) URL (sent as is)")
    parser.add_argument("--param", action="append", type=parse_param, default=[], metavar="NAME=VALUE")
    parser.add_argument("--requests", type=int, default=20, help="measured requests at most (default 20)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1)")
    parser.add_argument("--duration", type=float, default=float("inf"), help="start no request after this many seconds")
    parser.add_argument("--mode", choices=["v2", "v1"], default="v2", help="v2 submit and poll (default), or v1 sync")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests first (default 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a request counts as timed out")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG of the latency distribution and over time")


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0 or args.duration <= 0:
        raise SystemExit("bench: --requests and --concurrency must be >= 1, --warmup >= 0, --duration > 0")
    target = Target(
        base_url=base_url(args.base_url),
        model=args.model,
        body={"image": image_value(args.image), **dict(args.param)},
        headers={"x-api-key": args.api_key} if args.api_key else {},
        mode=args.mode,
        timeout=args.timeout,
    )
    limits = {
        "concurrency": args.concurrency,
        "requests_limit": args.requests,
        "duration_limit_s": None if args.duration == float("inf") else args.duration,
        "warmup": args.warmup,
        "params": dict(args.param),
    }
    samples, wall = asyncio.run(run_load(target, args.requests, args.concurrency, args.duration, args.warmup))
    report = summarize(samples, wall, target, limits)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0 if report["requests"]["ok"] else 1
