"""SAM 3D Body outputs on four real estimator outputs: GLB, PLY, keypoint JSON, preview PNG, SMPL(-X) topology."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.sam3d_body.smplx_fit import find_smplx_model, fit_smplx, load_smplx, matrix_to_axis_angle
from models.sam3d_body.topology import SMPL_MAPPING, SMPLX_MAPPING, load_mapping
from pipeline.body_outputs import (
    MHR70_NAMES,
    MHR70_SKELETON,
    camera_vertices,
    keypoints_json,
    person_ply,
    scene_glb,
    visualization_png,
)
from pipeline.mesh_io import MeshNode, glb_bytes, opencv_to_gltf, read_ply, write_ply

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "mhr"
WIDTH, HEIGHT = 1920, 890
PRINCIPAL = (960.0, 445.0)
README_FOCAL = 2535.3

COMPONENTS = {5121: np.uint8, 5125: np.uint32, 5126: np.float32}
TYPE_SIZES = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    mesh = read_ply(FIXTURES / "mhr_face_mask.ply")
    assert mesh.vertices.shape == (18439, 3) and mesh.faces.shape == (36874, 3)
    return mesh.faces


@pytest.fixture(scope="module")
def people() -> list[dict]:
    if not FIXTURES.is_dir():
        pytest.fail(f"{FIXTURES} is missing: the tests expect the repository checked out beside shared/")
    loaded = []
    for i in range(4):
        with np.load(FIXTURES / f"img_subj{i:02d}.npz") as data:
            loaded.append(dict(data, focal_length=np.float32(README_FOCAL)))
    return loaded


def read_glb(data: bytes) -> tuple[dict, bytes]:
    """Header, chunk layout and alignment checks of a GLB; returns its JSON and BIN chunk."""
    magic, version, length = struct.unpack_from("<III", data)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_length, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A and json_length % 4 == 0
    document = json.loads(data[20 : 20 + json_length])
    offset = 20 + json_length
    binary = b""
    if offset < len(data):
        bin_length, bin_type = struct.unpack_from("<II", data, offset)
        assert bin_type == 0x004E4942 and bin_length % 4 == 0
        binary = data[offset + 8 : offset + 8 + bin_length]
        offset += 8 + bin_length
        assert document["buffers"] == [{"byteLength": bin_length}]
    assert offset == len(data)
    assert document["asset"]["version"] == "2.0"
    return document, binary


def accessor(document: dict, binary: bytes, index: int) -> np.ndarray:
    """An accessor's elements, honouring byteStride; checks the spec's alignment and bounds rules."""
    acc = document["accessors"][index]
    view = document["bufferViews"][acc["bufferView"]]
    dtype = np.dtype(COMPONENTS[acc["componentType"]])
    width = TYPE_SIZES[acc["type"]]
    stride = view.get("byteStride", dtype.itemsize * width)
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    assert start % 4 == 0 and stride % 4 == 0
    assert view["byteOffset"] + view["byteLength"] <= len(binary)
    assert stride * (acc["count"] - 1) + dtype.itemsize * width <= view["byteLength"]
    raw = np.frombuffer(binary, dtype=np.uint8, count=stride * acc["count"], offset=start).reshape(acc["count"], stride)
    return raw[:, : dtype.itemsize * width].copy().view(dtype).reshape(acc["count"], width)


def check_closed(faces: np.ndarray, vertex_count: int) -> None:
    """Every edge is shared by exactly two faces, in opposite directions; Euler characteristic 2."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    assert len(np.unique(directed, axis=0)) == len(directed)  # consistent orientation
    _, counts = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
    assert np.all(counts == 2)
    assert vertex_count - len(counts) + len(faces) == 2


def test_scene_glb_holds_every_person_in_gltf_camera_space(people: list[dict], faces: np.ndarray) -> None:
    document, binary = read_glb(scene_glb(people, faces))
    assert document["scenes"][document["scene"]]["nodes"] == [0, 1, 2, 3]
    assert [node["name"] for node in document["nodes"]] == ["person_0", "person_1", "person_2", "person_3"]
    for node, person in zip(document["nodes"], people):
        (primitive,) = document["meshes"][node["mesh"]]["primitives"]
        assert primitive.get("mode", 4) == 4 and document["materials"][primitive["material"]]
        attributes = primitive["attributes"]
        positions = accessor(document, binary, attributes["POSITION"])
        normals = accessor(document, binary, attributes["NORMAL"])
        colours = accessor(document, binary, attributes["COLOR_0"])
        indices = accessor(document, binary, primitive["indices"]).reshape(-1, 3)
        assert positions.shape == normals.shape == (18439, 3) and indices.shape == (36874, 3)
        position_accessor = document["accessors"][attributes["POSITION"]]
        assert position_accessor["min"] == positions.min(axis=0).tolist()
        assert position_accessor["max"] == positions.max(axis=0).tolist()
        # y and z flipped: glTF's camera looks down -z with y up.
        expected = (person["pred_vertices"].astype(np.float64) + person["pred_cam_t"]) * [1, -1, -1]
        np.testing.assert_allclose(positions, expected, atol=1e-6)
        assert np.all(positions[:, 2] < 0)  # everyone in front of a glTF camera at the origin
        np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
        # Outward normals: the vertex farthest along +x has a normal pointing +x.
        assert normals[positions[:, 0].argmax(), 0] > 0
        assert len(np.unique(colours, axis=0)) == 1
        np.testing.assert_array_equal(indices, faces)
        check_closed(indices.astype(np.int64), len(positions))


def test_scene_glb_loads_in_trimesh(people: list[dict], faces: np.ndarray) -> None:
    trimesh = pytest.importorskip("trimesh")
    scene = trimesh.load(io.BytesIO(scene_glb(people[:2], faces)), file_type="glb", process=False)
    assert sorted(scene.graph.nodes_geometry) == ["person_0", "person_1"]
    for name, person in zip(["person_0", "person_1"], people):
        transform, geometry = scene.graph[name]
        np.testing.assert_allclose(transform, np.eye(4))
        mesh = scene.geometry[geometry]
        assert mesh.is_watertight and mesh.euler_number == 2
        np.testing.assert_allclose(mesh.vertices, opencv_to_gltf(camera_vertices(person)), atol=1e-6)


def test_glb_with_no_people_is_an_empty_scene(faces: np.ndarray) -> None:
    data = scene_glb([], faces)
    document, binary = read_glb(data)
    assert document["scenes"] == [{}] and document["scene"] == 0
    assert binary == b"" and "nodes" not in document and "buffers" not in document


def test_glb_node_translation_and_rgba_colours() -> None:
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    tetrahedron = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    rgba = np.arange(16, dtype=np.uint8).reshape(4, 4)
    node = MeshNode("tet", vertices, tetrahedron, colors=rgba, translation=np.array([1.0, 2.0, 3.0]))
    document, binary = read_glb(glb_bytes([node]))
    assert document["nodes"] == [{"name": "tet", "mesh": 0, "translation": [1.0, 2.0, 3.0]}]
    colour = document["meshes"][0]["primitives"][0]["attributes"]["COLOR_0"]
    assert document["accessors"][colour]["type"] == "VEC4" and document["accessors"][colour]["normalized"]
    np.testing.assert_array_equal(accessor(document, binary, colour), rgba)


def test_keypoints_json_follows_the_opencv_pinhole_camera(people: list[dict]) -> None:
    """keypoints_2d = f (x, y) / z + (960, 445) to 0.01 px, with the focal fitted by least squares."""
    assert len(MHR70_NAMES) == 70 and all(0 <= a < 70 and 0 <= b < 70 for a, b in MHR70_SKELETON)
    documents = [json.loads(json.dumps(keypoints_json(person))) for person in people]
    rays, pixels = [], []
    for document in documents:
        assert document["keypoint_names"] == list(MHR70_NAMES)
        points, image = np.array(document["keypoints_3d"]), np.array(document["keypoints_2d"])
        assert points.shape == (70, 3) and image.shape == (70, 2) and np.all(points[:, 2] > 0)
        rays.append(points[:, :2] / points[:, 2:])
        pixels.append(image - PRINCIPAL)
    rays, pixels = np.concatenate(rays).ravel(), np.concatenate(pixels).ravel()
    focal = float(rays @ pixels / (rays @ rays))
    assert abs(focal - README_FOCAL) < 0.1
    assert np.abs(focal * rays - pixels).max() < 0.01
    np.testing.assert_allclose(
        documents[0]["keypoints_3d"], people[0]["pred_keypoints_3d"] + people[0]["pred_cam_t"], atol=1e-6
    )


def test_person_ply_round_trip(people: list[dict], faces: np.ndarray) -> None:
    mesh = read_ply(person_ply(people[1], faces))
    assert mesh.vertices.shape == (18439, 3) and mesh.colors is None
    np.testing.assert_array_equal(mesh.faces, faces)
    np.testing.assert_allclose(mesh.vertices, opencv_to_gltf(camera_vertices(people[1])), atol=1e-6)

    colours = np.random.default_rng(0).integers(0, 256, (18439, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    write_ply(buffer, mesh.vertices, faces, colours)
    again = read_ply(buffer.getvalue())
    np.testing.assert_array_equal(again.vertices, mesh.vertices)
    np.testing.assert_array_equal(again.faces, faces)
    np.testing.assert_array_equal(again.colors, colours)


@pytest.mark.parametrize(("path", "count"), [(SMPLX_MAPPING, 10475), (SMPL_MAPPING, 6890)])
def test_topology_mapping_on_real_outputs(people: list[dict], faces: np.ndarray, path: Path, count: int) -> None:
    mapping = load_mapping(path)
    assert mapping.n_target == count
    batch = np.stack([camera_vertices(person) for person in people])
    mapped = mapping.apply(batch, faces)
    assert mapped.shape == (4, count, 3) and np.all(np.isfinite(mapped))
    np.testing.assert_allclose(mapped[2], mapping.apply(batch[2], faces))
    triangles = batch[:, faces[mapping.triangle_ids]]  # (4, n, 3 corners, 3)
    assert np.all(mapped >= triangles.min(axis=2) - 1e-9) and np.all(mapped <= triangles.max(axis=2) + 1e-9)
    for person, source in zip(mapped, batch):  # the mapped surface spans the whole body
        np.testing.assert_allclose(np.ptp(person, axis=0), np.ptp(source, axis=0), atol=0.02)
        assert 1.4 < np.ptp(person[:, 1]) < 2.3  # upright; with the arms raised up to 2.2 m
    rest = read_ply(FIXTURES / "mhr_face_mask.ply").vertices / 100  # centimetres, y up
    assert 1.5 < np.ptp(mapping.apply(rest, faces)[:, 1]) < 2.0


def test_visualization_png(people: list[dict], faces: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((HEIGHT, WIDTH, 3)) * 40 + 100).astype(np.uint8)
    data = visualization_png(image, people, faces)
    assert data == visualization_png(image, people, faces)
    strip = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    panel_h, panel_w = round(HEIGHT * 1024 / WIDTH), 1024
    assert strip.shape == (panel_h, 4 * panel_w, 3)
    source, keypoints, overlay, side = (strip[:, i * panel_w : (i + 1) * panel_w].astype(int) for i in range(4))
    scale = panel_w / WIDTH
    points = np.concatenate([p["pred_keypoints_2d"] for p in people]) * scale
    pelvis = [(p["pred_keypoints_2d"][9] + p["pred_keypoints_2d"][10]) / 2 * scale for p in people]
    for x, y in pelvis:  # the mesh covers each person's hips
        assert np.abs(overlay[int(y), int(x)] - source[int(y), int(x)]).sum() > 30
    assert (np.abs(keypoints - source).sum(axis=2) > 0).sum() > 1000
    # Far from every person (beyond their keypoints' box with a margin) the overlay is the input.
    x0, y0 = points.min(axis=0) - 60
    x1, y1 = points.max(axis=0) + 60
    far = np.ones((panel_h, panel_w), dtype=bool)
    far[max(0, int(y0)) : int(y1), max(0, int(x0)) : int(x1)] = False
    assert far.sum() > panel_h * panel_w / 2
    np.testing.assert_array_equal(overlay[far], source[far])
    # The side view is drawn on white, with the scene framed inside the panel.
    assert np.all(side[:, :5] == 255) and np.all(side[:5] == 255)
    assert (side != 255).any(axis=2).mean() > 0.05


def test_visualization_without_people() -> None:
    image = np.full((40, 60, 3), 90, dtype=np.uint8)
    strip = np.asarray(Image.open(io.BytesIO(visualization_png(image, [], np.zeros((0, 3), dtype=int)))))
    assert strip.shape == (40, 240, 3)
    np.testing.assert_array_equal(strip[:, :180], np.tile(image, (1, 3, 1)))
    assert np.all(strip[:, 180:] == 255)


def test_matrix_to_axis_angle_round_trips_through_rodrigues() -> None:
    from smplx.lbs import batch_rodrigues

    rng = np.random.default_rng(0)
    axes = rng.normal(size=(64, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate([rng.uniform(0, np.pi, 60), [0.0, 1e-7, np.pi, np.pi]])
    rotvecs = axes * angles[:, None]
    matrices = batch_rodrigues(torch.as_tensor(rotvecs)).numpy()
    recovered = batch_rodrigues(torch.as_tensor(matrix_to_axis_angle(matrices))).numpy()
    np.testing.assert_allclose(recovered, matrices, atol=1e-6)


SMPLX_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15]
SMPLX_PARENTS += [wrist if i % 3 == 0 else first + i - 1 for wrist, first in ((20, 25), (21, 40)) for i in range(15)]


def write_synthetic_smplx(path: Path, faces: np.ndarray, seed: int = 0) -> None:
    """An SMPL-X model file with the real keys, shapes and dtypes, but made-up contents.

    The template is the MHR rest mesh mapped to SMPL-X order (a human shape in metres); 55 joints are
    spread over it by farthest-point sampling, each regressed from its 20 nearest vertices; skinning
    weights fall off with distance to the 4 nearest joints; shape directions are smooth random fields.
    """
    rng = np.random.default_rng(seed)
    template = load_mapping(SMPLX_MAPPING).apply(read_ply(FIXTURES / "mhr_face_mask.ply").vertices / 100.0, faces)
    count = len(template)
    chosen = [int(template[:, 1].argmax())]
    distance = np.linalg.norm(template - template[chosen[0]], axis=1)
    while len(chosen) < 55:
        chosen.append(int(distance.argmax()))
        distance = np.minimum(distance, np.linalg.norm(template - template[chosen[-1]], axis=1))
    regressor = np.zeros((55, count))
    for joint, vertex in enumerate(chosen):
        regressor[joint, np.argsort(np.linalg.norm(template - template[vertex], axis=1))[:20]] = 1 / 20
    squared = ((template[:, None] - (regressor @ template)[None]) ** 2).sum(axis=-1)
    weights = np.exp(-(squared - squared.min(axis=1, keepdims=True)) / 0.05**2)
    weights[weights < np.sort(weights, axis=1)[:, -4:-3]] = 0
    weights /= weights.sum(axis=1, keepdims=True)
    frequencies = rng.normal(0, 3, (400, 3, 3))
    phases = rng.uniform(0, 2 * np.pi, (400, 3))
    shapedirs = 0.01 * np.sin(np.einsum("vi,kci->vck", template, frequencies) + phases.T[None])
    components = np.linalg.qr(rng.normal(size=(45, 45)))[0]
    np.savez(
        path,
        v_template=template,
        shapedirs=shapedirs.astype(np.float32),
        posedirs=rng.normal(0, 1e-3, (count, 3, 486)).astype(np.float32),
        J_regressor=regressor,
        weights=weights,
        kintree_table=np.stack([np.array(SMPLX_PARENTS) % 2**32, np.arange(55)]).astype(np.uint32),
        f=rng.integers(0, count, (20908, 3)).astype(np.uint32),
        hands_componentsl=components,
        hands_componentsr=components.T,
        hands_meanl=rng.normal(0, 0.1, 45),
        hands_meanr=rng.normal(0, 0.1, 45),
        lmk_faces_idx=rng.integers(0, 20908, 51),
        lmk_bary_coords=np.full((51, 3), 1 / 3),
        joint2num=np.array({"pelvis": 0}, dtype=object),  # real files carry pickled objects; never unpickled
    )


@pytest.mark.slow
def test_fit_smplx_recovers_a_synthetic_body(tmp_path: Path, faces: np.ndarray) -> None:
    assert find_smplx_model(tmp_path) is None
    (tmp_path / "smplx").mkdir()
    path = tmp_path / "smplx" / "SMPLX_NEUTRAL.npz"
    write_synthetic_smplx(path, faces)
    assert find_smplx_model(tmp_path) == path

    rng = np.random.default_rng(1)
    truth = {
        "betas": rng.normal(0, 1, (1, 10)),
        "global_orient": np.array([[np.pi, 0.0, 0.0]]),  # y down, as camera-space outputs are
        "body_pose": rng.normal(0, 0.1, (1, 63)),
        "left_hand_pose": rng.normal(0, 0.1, (1, 45)),
        "right_hand_pose": rng.normal(0, 0.1, (1, 45)),
        "transl": np.array([[0.3, 0.2, 6.0]]),
    }
    model = load_smplx(path, batch_size=1)
    with torch.no_grad():
        targets = model(**{k: torch.as_tensor(v, dtype=torch.float32) for k, v in truth.items()}).vertices.numpy()
    (start,) = fit_smplx(targets, path, steps=0)
    (fit,) = fit_smplx(targets, path, steps=200, max_seconds=120)
    assert fit["fitted_vertices"].shape == (10475, 3) and fit["faces"].shape == (20908, 3)
    assert fit["params"]["body_pose"].shape == (63,) and fit["params"]["betas"].shape == (10,)
    assert start["mean_error_m"] > 0.03
    assert fit["mean_error_m"] < 0.01 and fit["mean_error_m"] < start["mean_error_m"] / 5
    np.testing.assert_allclose(
        np.linalg.norm(fit["fitted_vertices"] - targets[0], axis=1).mean(), fit["mean_error_m"], rtol=1e-6
    )


def test_load_smplx_rejects_other_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", v_template=np.zeros((10, 3)))
    with pytest.raises(ValueError, match="missing"):
        load_smplx(tmp_path / "other.npz", batch_size=1)
