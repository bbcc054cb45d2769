"""Fuzzing the HTTP surface: schemathesis against the served OpenAPI schema, and hostile image inputs.

1. schemathesis generates requests for every operation of `/openapi.json` (valid and invalid
   bodies and path parameters, boundary values), sent with the API key: no response is a 5xx, and
   every response whose status the schema declares conforms to it. In half of the valid bodies the
   generated `image` is replaced by a real tiny PNG so that fuzzed parameters reach the workers;
   every job accepted that way must then COMPLETE.
2. Hostile images through `/v2/sam3-image` (`image`) and `/v2/sam-3d-body` (`mask`): truncated,
   bombs, other formats, bad base64, wrong data: URIs. Each is a 400 `{"error": "image: ..."}` (or
   `mask: ...`) with a clear message, and the server keeps serving.
3. Byte-level mutations of real images into the decoder itself, in process: anything it cannot
   decode is an `ImageInputError` (a 400), never another exception (a 500).
"""

from __future__ import annotations

import base64
import io
import random
import struct
import time
import warnings
import zlib
from collections import Counter, defaultdict

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import noise_image, png_b64
from tests.server_process import ServerProcess

KEY = "fuzz-key"
AUTH = {"x-api-key": KEY}
MAX_EXAMPLES = 50  # per operation and generation mode: the whole schemathesis run stays near a minute here
H, W = 48, 64
IMAGE = png_b64(noise_image(H, W))
MASK_PIXELS = np.zeros((H, W, 3), np.uint8)
MASK_PIXELS[10:40, 20:40] = 255
MASK = png_b64(MASK_PIXELS)
JOB_BOUND = 120.0  # seconds by which every job accepted during the fuzz run must have finished


@pytest.fixture(scope="module")
def server(all_weights_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz") / "data"
    args = ("--api-key", KEY, "--max-queue", "1000", "--max-batch-size", "4", "--job-timeout", str(int(JOB_BOUND)))
    proc = ServerProcess(all_weights_dir, data, *args).start()
    yield proc
    proc.terminate()


# -- 1. schemathesis ---------------------------------------------------------------------------


def reach_the_worker(case, draw: int) -> bool:
    """Half of the valid bodies get a real image, so that their parameters run through the model.

    Bounded so that the run stays short: an automatic-mask grid of at most 16 per side, at most 4
    people; a generated mask is replaced by a valid one. A 3D object is given by that mask (a text or
    box prompt on the random SAM 3 may rightly find nothing) and sampled with one step per flow.
    """
    body = case.body
    if draw % 2 or not (isinstance(body, dict) and isinstance(body.get("image"), str)):
        return False
    body["image"] = IMAGE
    if case.operation.path.endswith("/sam-3d-objects"):
        for name in ("prompt", "bounding_box", "point_coords", "point_labels"):
            body.pop(name, None)
        body.update(mask=MASK, geometry_steps=1, latent_steps=1)
    if isinstance(body.get("points_per_side"), int):
        body["points_per_side"] = min(body["points_per_side"], 16)
    if isinstance(body.get("max_people"), int):
        body["max_people"] = min(body["max_people"], 4)
    if isinstance(body.get("mask"), str):
        body["mask"] = MASK
    return True


def fuzz_operation(operation, mode: GenerationMode, calls: Counter, jobs: list[tuple[str, str]]):
    """One Hypothesis run over one operation in one mode: explicit examples, then generated ones."""
    label = f"{operation.method.upper()} {operation.path}"
    submits = operation.method.upper() == "POST" and operation.path.startswith("/v2/")

    @seed(zlib.crc32(f"{label} {mode.value}".encode()))  # reproducible, and different for each run
    @given(case=operation.as_strategy(generation_mode=mode), draw=st.integers(0, 1))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each step would be a request
        suppress_health_check=list(HealthCheck),
    )
    def run(case, draw: int) -> None:
        real_image = mode is GenerationMode.POSITIVE and reach_the_worker(case, draw)
        response = case.call(headers=AUTH, timeout=60)
        calls[response.status_code] += 1
        calls["real image"] += real_image
        if submits and response.status_code == 200:
            jobs.append((label, response.json()["request_id"]))
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    return run


def test_schemathesis_no_5xx_and_declared_responses_conform(server):
    """Every operation of /openapi.json, valid then invalid data: no 5xx; declared responses conform.

    Each operation and mode is its own Hypothesis run, so that one failure does not hide another;
    no shrinking (each step is a request), the first failing example of each is reported.
    """
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    calls: dict[str, Counter] = defaultdict(Counter)
    jobs: list[tuple[str, str]] = []
    failures: list[str] = []
    started = time.monotonic()
    operations = [result.ok() for result in api.get_all_operations()]
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, calls[label], jobs)()
            except Unsatisfiable:  # nothing in this operation can be made invalid (e.g. only string path parameters)
                calls[label][f"no {mode.value} case"] += 1
            except Exception as exc:  # the run's first failing example, with schemathesis's report
                failures.append(f"{label} ({mode.value}): {type(exc).__name__}: {exc}")
    elapsed = time.monotonic() - started
    for label, counted in sorted(calls.items()):
        requests = sum(n for code, n in counted.items() if isinstance(code, int))
        print(f"\n  {label}: {requests} requests, {dict(counted)}")
    total = sum(n for counted in calls.values() for code, n in counted.items() if isinstance(code, int))
    print(
        f"\nschemathesis: {len(operations)} operations, {total} requests, {len(jobs)} jobs accepted, "
        f"{len(failures)} failing runs, {elapsed:.1f} s"
    )
    JOBS_ACCEPTED.extend(jobs)
    assert len(operations) >= 10, [f"{o.method} {o.path}" for o in operations]
    assert not failures, "\n\n".join(failures)


JOBS_ACCEPTED: list[tuple[str, str]] = []  # (operation, request_id) of every submit the fuzz run got accepted


def test_schemathesis_jobs_all_completed(server):
    """Runs after the schemathesis test (same module): every job it got accepted COMPLETED."""
    states: dict[str, Counter] = defaultdict(Counter)
    errors = []
    deadline = time.monotonic() + JOB_BOUND
    for operation, job_id in JOBS_ACCEPTED:
        left = max(1.0, deadline - time.monotonic())
        body = server.wait_for_state(job_id, {"COMPLETED", "FAILED"}, timeout=left, headers=AUTH)
        states[operation][body["status"]] += 1
        if body["status"] != "COMPLETED":
            errors.append((operation, job_id, body.get("error")))
        else:
            result = httpx.get(body["response_url"], headers=AUTH, timeout=10)
            assert result.status_code == 200, (operation, job_id, result.text)
    print(f"\nschemathesis: {len(JOBS_ACCEPTED)} jobs accepted, final states {dict(states)}")
    assert not errors, errors
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log()


# -- 2. hostile images through the API ---------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, extra_chunks: bytes = b"") -> bytes:
    """A well-formed PNG whose header declares `width` x `height` (its pixel data is a few bytes)."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    pixels = png_chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * min(width, 8))))
    return b"\x89PNG\r\n\x1a\n" + header + extra_chunks + pixels + png_chunk(b"IEND", b"")


RGB = Image.fromarray(noise_image(H, W, seed=1))
PNG = encode(RGB, "PNG")
JPEG = encode(RGB, "JPEG")


def jpeg_declaring(width: int, height: int) -> bytes:
    """The JPEG above with its frame header (SOF0) claiming another size."""
    at = JPEG.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height and width
    return JPEG[:at] + struct.pack(">HH", height, width) + JPEG[at + 4 :]


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"><rect width="64" height="48"/></svg>'
ZTXT_BOMB = png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"a" * (4 << 20)))  # 4 MiB of text from 4 KiB
UNDECODABLE = "cannot decode the image (truncated or corrupt)"
NOT_AN_IMAGE = "not a supported image format"
NOT_BASE64 = "not an http(s) URL, a data URI, or valid base64"
REQUIRED = "required, as an http(s) URL, base64, or a data: URI"

# (case, value of the image parameter, what the message must say)
HOSTILE_IMAGES = [
    ("truncated PNG", b64(PNG[: len(PNG) // 2]), UNDECODABLE),
    ("PNG cut inside its header", b64(PNG[:24]), UNDECODABLE),
    ("truncated JPEG", b64(JPEG[: len(JPEG) // 2]), UNDECODABLE),
    ("JPEG cut inside its header", b64(JPEG[:40]), UNDECODABLE),
    ("bomb: PNG declaring 100000x100000", b64(png_declaring(100_000, 100_000)), "100000x100000 = 10000000000 pixels"),
    ("bomb: JPEG declaring 65000x65000", b64(jpeg_declaring(65_000, 65_000)), "65000x65000 = 4225000000 pixels"),
    ("bomb: PNG text chunk inflating to 4 MiB", b64(png_declaring(8, 8, ZTXT_BOMB)), UNDECODABLE),
    ("PDF", b64(PDF), NOT_AN_IMAGE),
    ("text file", b64(b"just some text\n"), NOT_AN_IMAGE),
    ("SVG", b64(SVG), NOT_AN_IMAGE),
    ("empty string", "", REQUIRED),
    ("only whitespace", " \n\t ", REQUIRED),
    ("a number", 12345, REQUIRED),
    ("a list", [b64(PNG)], REQUIRED),
    ("null", None, REQUIRED),
    ("invalid base64", "this is not base64!", NOT_BASE64),
    ("base64 with bad padding", b64(PNG)[:-3], NOT_BASE64),
    ("data: URI not base64-encoded", "data:image/png,abcd", "data URI must be base64-encoded"),
    ("data: URI of a PNG holding a PDF", "data:image/png;base64," + b64(PDF), NOT_AN_IMAGE),
    ("data: URI holding nothing", "data:image/png;base64,", NOT_AN_IMAGE),
    ("ftp URL", "ftp://example.com/image.png", NOT_BASE64),
    ("loopback URL", "http://127.0.0.1:9/image.png", "loopback, private or link-local"),
    ("data: URI declaring a PDF, holding a PNG", "data:application/pdf;base64," + b64(PNG), "application/pdf"),
]
HOSTILE_IMAGE_PARAMS = [pytest.param(*case, id=case[0]) for case in HOSTILE_IMAGES]


def assert_refused(response: httpx.Response, parameter: str, expected: str) -> str:
    assert response.status_code == 400, f"{response.status_code}: {response.text[:300]}"
    error = response.json()["error"]
    assert error.startswith(f"{parameter}: ") and expected in error, error
    return error


@pytest.mark.parametrize(("case", "image", "expected"), HOSTILE_IMAGE_PARAMS)
def test_hostile_image_is_a_400_naming_the_image(server, case, image, expected):
    started = time.perf_counter()
    body = {"image": image, "text_prompt": "cat"}
    response = httpx.post(f"{server.url}/v2/sam3-image", json=body, headers=AUTH, timeout=30)
    elapsed = (time.perf_counter() - started) * 1000
    print(f"\n{case}: HTTP {response.status_code} in {elapsed:.0f} ms: {response.text[:200]}")
    assert_refused(response, "image", expected)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def mask_png(pixels: np.ndarray) -> str:
    return b64(encode(Image.fromarray(pixels), "PNG"))


MASK_PNG = encode(Image.fromarray(MASK_PIXELS), "PNG")
HOSTILE_MASKS = [
    ("truncated PNG", b64(MASK_PNG[: len(MASK_PNG) // 2]), UNDECODABLE),
    ("bomb: PNG declaring 100000x100000", b64(png_declaring(100_000, 100_000)), "over the limit"),
    ("bomb: PNG text chunk inflating to 4 MiB", b64(png_declaring(8, 8, ZTXT_BOMB)), UNDECODABLE),
    ("PDF", b64(PDF), NOT_AN_IMAGE),
    ("empty string", "", NOT_AN_IMAGE),
    ("invalid base64", "this is not base64!", NOT_BASE64),
    ("another size than the image", mask_png(np.full((H + 1, W, 3), 255, np.uint8)), f"same size as the image ({W}x"),
    ("grey, not a mask", mask_png(noise_image(H, W, seed=2)), "not a binary mask"),
    ("all black", mask_png(np.zeros((H, W, 3), np.uint8)), "no white (foreground) pixel"),
]


@pytest.mark.parametrize(("case", "mask", "expected"), HOSTILE_MASKS, ids=[c[0] for c in HOSTILE_MASKS])
def test_hostile_mask_is_a_400_naming_the_mask(server, case, mask, expected):
    body = {"image": IMAGE, "mask": mask}
    response = httpx.post(f"{server.url}/v2/sam-3d-body", json=body, headers=AUTH, timeout=30)
    print(f"\nmask {case}: HTTP {response.status_code}: {response.text[:200]}")
    assert_refused(response, "mask", expected)


GREY16 = Image.fromarray(np.arange(H * W, dtype=np.uint16).reshape(H, W) * 19)
FLOATS = Image.fromarray(np.random.default_rng(0).random((H, W), np.float32) * 1e6)
ODD_BUT_VALID = [  # (case, image, the image_size the result must report)
    ("animated GIF (first frame)", b64(encode(RGB, "GIF", save_all=True, append_images=[RGB.rotate(90)] * 2)), [W, H]),
    ("1x1 PNG", b64(encode(Image.new("RGB", (1, 1)), "PNG")), [1, 1]),
    ("1x2000 PNG", b64(encode(Image.new("L", (1, 2000)), "PNG")), [1, 2000]),
    ("16-bit grey PNG", b64(encode(GREY16, "PNG")), [W, H]),
    ("CMYK JPEG", b64(encode(RGB.convert("CMYK"), "JPEG")), [W, H]),
    ("float TIFF", b64(encode(FLOATS, "TIFF")), [W, H]),
    ("data: URI declaring a JPEG, holding a PNG", "data:image/jpeg;base64," + b64(PNG), [W, H]),
]


def test_odd_but_valid_images_complete_and_the_server_keeps_serving(server):
    """After every hostile input above: odd but valid images are accepted and complete, as do normal jobs."""
    submitted = {}
    for case, image, _ in ODD_BUT_VALID:
        body = {"image": image, "text_prompt": "cat"}
        response = httpx.post(f"{server.url}/v2/sam3-image", json=body, headers=AUTH, timeout=30)
        assert response.status_code == 200, (case, response.text)
        submitted[case] = response.json()["request_id"]
    body = {"image": IMAGE, "mask": MASK, "inference_mode": "body"}
    person = httpx.post(f"{server.url}/v2/sam-3d-body", json=body, headers=AUTH, timeout=30)
    assert person.status_code == 200, person.text
    for case, _, size in ODD_BUT_VALID:
        status = server.wait_for_state(submitted[case], {"COMPLETED", "FAILED"}, timeout=60, headers=AUTH)
        result = httpx.get(status["response_url"], headers=AUTH, timeout=10).json()
        seconds = result["metrics"].get("total_time")
        print(f"\n{case}: {result['status']}, image_size {result.get('image_size')}, {seconds} s")
        assert result["status"] == "COMPLETED" and result["image_size"] == size, (case, result)
    status = server.wait_for_state(person.json()["request_id"], {"COMPLETED", "FAILED"}, timeout=60, headers=AUTH)
    result = httpx.get(status["response_url"], headers=AUTH, timeout=10).json()
    print(f"\nsam-3d-body with a mask: {result['status']}, {result['metadata']['num_people']} person")
    assert result["status"] == "COMPLETED" and result["metadata"]["num_people"] == 1
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log()


@pytest.mark.parametrize("focal_length", [1e39, 1e-300, 0.5, 1.0, 1e6])
def test_an_extreme_focal_length_is_refused_or_gives_a_result(server, focal_length):
    """A float32 overflow or underflow once stored NaN/inf in the result, whose routes then answered 500."""
    body = {"image": IMAGE, "mask": MASK, "inference_mode": "body", "focal_length": focal_length}
    response = httpx.post(f"{server.url}/v2/sam-3d-body", json=body, headers=AUTH, timeout=30)
    print(f"\nfocal_length {focal_length}: submit HTTP {response.status_code} {response.text[:100]}")
    if response.status_code == 400:
        assert response.json()["error"].startswith("focal_length: ")
        return
    assert response.status_code == 200, response.text
    status = server.wait_for_state(response.json()["request_id"], {"COMPLETED", "FAILED"}, timeout=60, headers=AUTH)
    for route in (status["response_url"], status["response_url"].replace("/v2/", "/v1/")):
        result = httpx.get(route, headers=AUTH, timeout=10)
        print(f"  {status['status']}, {route.split('/requests/')[0]} result HTTP {result.status_code}")
        assert result.status_code == 200 and result.json()["status"] == "COMPLETED", result.text


# -- 3. mutated images into the decoder, in process --------------------------------------------

MUTATIONS = 4000


def test_mutated_images_are_decoded_or_refused_never_an_unexpected_exception():
    """Random byte flips, cuts and insertions into real files of every common format (seeded)."""
    from server.images import ImageInputError, decode_image

    seeds = {}
    small = Image.fromarray(noise_image(12, 16, seed=3))
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA", "JPEG2000", "SGI", "PCX"):
        try:
            seeds[fmt] = encode(small, fmt)
        except (KeyError, OSError, ValueError):  # a codec this Pillow lacks
            pass
    rng = random.Random(5)
    outcomes: Counter = Counter()
    escaped = []
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(MUTATIONS):
            fmt = sorted(seeds)[i % len(seeds)]
            data = bytearray(seeds[fmt])
            kind = rng.choice(("flip", "cut", "insert"))
            if kind == "flip":
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == "cut":
                del data[rng.randrange(len(data)) :]
            else:
                at = rng.randrange(len(data))
                data[at:at] = rng.randbytes(rng.randint(1, 16))
            try:
                decode_image(bytes(data), 50_000_000)
                outcomes["decoded"] += 1
            except ImageInputError:
                outcomes["refused"] += 1
            except Exception as exc:  # would be a 500
                escaped.append(f"{fmt} {kind}: {type(exc).__name__}: {exc}")
    print(
        f"\n{MUTATIONS} mutated images of {len(seeds)} formats ({', '.join(sorted(seeds))}) in "
        f"{time.perf_counter() - started:.1f} s: {dict(outcomes)}, {len(escaped)} unexpected exceptions"
    )
    assert not escaped, escaped[:10]
