"""Files for the SAM 3D Body endpoint: a GLB scene, per-person PLYs, keypoint JSON and a preview PNG.

Each person is a dict of the estimator's outputs, numpy arrays (or anything `np.asarray` takes), in the
OpenCV camera frame (x right, y down, z forward; metres): `pred_vertices` (V, 3) and `pred_keypoints_3d`
(70, 3) without the camera translation, `pred_cam_t` (3,), `pred_keypoints_2d` (70, 2) in image pixels,
`focal_length` (pixels) and `bbox` (4,) xyxy. `faces` (F, 3) is the MHR mesh shared by everyone.

The preview is drawn on the CPU by a small numpy z-buffer rasterizer (see `_rasterize`), with no GL.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.mesh_io import MeshNode, glb_bytes, opencv_to_gltf, vertex_normals, write_ply
from pipeline.render import palette, png_bytes

Person = dict[str, Any]

# The 70 MHR keypoints SAM 3D Body predicts, in output order (sam_3d_body/metadata/mhr70.py).
MHR70_NAMES: tuple[str, ...] = (
    "nose", "left-eye", "right-eye", "left-ear", "right-ear", "left-shoulder", "right-shoulder",
    "left-elbow", "right-elbow", "left-hip", "right-hip", "left-knee", "right-knee", "left-ankle",
    "right-ankle", "left-big-toe-tip", "left-small-toe-tip", "left-heel", "right-big-toe-tip",
    "right-small-toe-tip", "right-heel", "right-thumb-tip", "right-thumb-first-joint",
    "right-thumb-second-joint", "right-thumb-third-joint", "right-index-tip", "right-index-first-joint",
    "right-index-second-joint", "right-index-third-joint", "right-middle-tip", "right-middle-first-joint",
    "right-middle-second-joint", "right-middle-third-joint", "right-ring-tip", "right-ring-first-joint",
    "right-ring-second-joint", "right-ring-third-joint", "right-pinky-tip", "right-pinky-first-joint",
    "right-pinky-second-joint", "right-pinky-third-joint", "right-wrist", "left-thumb-tip",
    "left-thumb-first-joint", "left-thumb-second-joint", "left-thumb-third-joint", "left-index-tip",
    "left-index-first-joint", "left-index-second-joint", "left-index-third-joint", "left-middle-tip",
    "left-middle-first-joint", "left-middle-second-joint", "left-middle-third-joint", "left-ring-tip",
    "left-ring-first-joint", "left-ring-second-joint", "left-ring-third-joint", "left-pinky-tip",
    "left-pinky-first-joint", "left-pinky-second-joint", "left-pinky-third-joint", "left-wrist",
    "left-olecranon", "right-olecranon", "left-cubital-fossa", "right-cubital-fossa", "left-acromion",
    "right-acromion", "neck",
)  # fmt: skip

# Skeleton links (keypoint index pairs) of the official MHR70 visualisation: legs, torso, arms, face, feet,
# then each finger from the wrist to the tip.
MHR70_SKELETON: tuple[tuple[int, int], ...] = (
    (13, 11), (11, 9), (14, 12), (12, 10), (9, 10), (5, 9), (6, 10), (5, 6), (5, 7), (6, 8), (7, 62),
    (8, 41), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (13, 15), (13, 16), (13, 17),
    (14, 18), (14, 19), (14, 20),
    (62, 45), (45, 44), (44, 43), (43, 42), (62, 49), (49, 48), (48, 47), (47, 46),
    (62, 53), (53, 52), (52, 51), (51, 50), (62, 57), (57, 56), (56, 55), (55, 54),
    (62, 61), (61, 60), (60, 59), (59, 58),
    (41, 24), (24, 23), (23, 22), (22, 21), (41, 28), (28, 27), (27, 26), (26, 25),
    (41, 32), (32, 31), (31, 30), (30, 29), (41, 36), (36, 35), (35, 34), (34, 33),
    (41, 40), (40, 39), (39, 38), (38, 37),
)  # fmt: skip

SIDE_COLOURS = {"left": (0, 255, 0), "right": (255, 128, 0)}
CENTRE_COLOUR = (51, 153, 255)
_SIDES = [name.split("-")[0] for name in MHR70_NAMES]
# Links within the left (right) side of the body are green (orange), the others blue.
LINK_COLOURS = tuple(
    SIDE_COLOURS.get(_SIDES[a], CENTRE_COLOUR) if _SIDES[a] == _SIDES[b] else CENTRE_COLOUR for a, b in MHR70_SKELETON
)
BACKGROUND = 255  # side-view background (white)
MAX_PANEL_SIZE = 1024  # longer side of one preview panel, in pixels
NEAR = 1e-3  # metres: faces with a corner nearer the camera than this are not drawn
AMBIENT = 0.35
LIGHT = np.array([-0.35, -0.5, -1.0]) / np.linalg.norm([-0.35, -0.5, -1.0])  # towards the light, OpenCV axes
FRAGMENT_CHUNK = 1 << 19  # candidate pixels per rasterizer batch: bounds its temporary memory
SIDE_MARGIN = 0.9  # fraction of the side panel the framed scene may fill


def camera_vertices(person: Person) -> np.ndarray:
    """The person's mesh in camera space (OpenCV axes, metres): `pred_vertices + pred_cam_t`."""
    return np.asarray(person["pred_vertices"], dtype=np.float64) + np.asarray(person["pred_cam_t"], dtype=np.float64)


def person_colours(count: int) -> np.ndarray:
    """Per-person uint8 RGB colours, the same in the GLB and the preview."""
    return palette(count).round().astype(np.uint8)


def scene_glb(people: Sequence[Person], faces: np.ndarray) -> bytes:
    """All people in one GLB, node `person_<i>` each, in camera space with glTF axes (y up, looking down -z).

    A viewer whose camera sits at the origin looking down -z sees the people where the photo shows them.
    Each mesh carries its person's preview colour as COLOR_0.
    """
    colours = person_colours(len(people))
    nodes = [
        MeshNode(
            name=f"person_{i}",
            vertices=opencv_to_gltf(camera_vertices(person)).astype(np.float32),
            faces=faces,
            colors=np.broadcast_to(colours[i], (len(person["pred_vertices"]), 3)),
        )
        for i, person in enumerate(people)
    ]
    return glb_bytes(nodes)


def person_ply(person: Person, faces: np.ndarray) -> bytes:
    """One person's mesh as binary PLY, in the same frame as `scene_glb`: camera space, glTF axes.

    This is also what the official demo writes (vertices + cam_t, rotated 180 degrees about x), so the PLYs
    and the GLB line up when opened together.
    """
    buffer = io.BytesIO()
    write_ply(buffer, opencv_to_gltf(camera_vertices(person)), faces)
    return buffer.getvalue()


def keypoints_json(person: Person) -> dict[str, list]:
    """The 70 MHR keypoints: `keypoints_2d` in image pixels and `keypoints_3d` in camera space.

    `keypoints_3d` is `pred_keypoints_3d + pred_cam_t`, metres, OpenCV axes (x right, y down, z forward), so
    `keypoints_2d = (f * x / z + cx, f * y / z + cy)`. Unlike the meshes these are not converted to glTF axes,
    so that they project with the usual pinhole formula. Rounded to 0.001 px and 1 micrometre.
    """
    keypoints_3d = np.asarray(person["pred_keypoints_3d"], dtype=np.float64) + np.asarray(
        person["pred_cam_t"], dtype=np.float64
    )
    return {
        "keypoint_names": list(MHR70_NAMES),
        "keypoints_2d": np.asarray(person["pred_keypoints_2d"], dtype=np.float64).round(3).tolist(),
        "keypoints_3d": keypoints_3d.round(6).tolist(),
    }


def _focal(person: Person) -> tuple[float, float]:
    fx, fy = np.broadcast_to(np.asarray(person["focal_length"], dtype=np.float64).reshape(-1), (2,))
    return float(fx), float(fy)


def _rasterize(
    vertices: np.ndarray,
    faces: np.ndarray,
    focal: tuple[float, float],
    centre: tuple[float, float],
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Which face each pixel sees: a z-buffer over camera-space `vertices` (OpenCV axes), pinhole projection.

    Returns the (H*W,) face index per pixel (-1: background) and the (N, 2) projected vertices. Faces are
    back-face culled (the meshes are closed, so only faces turned to the camera can be seen), then grouped by
    the power-of-two size of their pixel bounding box; each group tests every pixel centre of its faces'
    boxes at once with edge functions, so the work is vectorised over faces and no Python loop runs per face.
    The nearest fragment (largest interpolated 1/z) wins; ties go to the higher face index, so the result
    is deterministic.
    """
    height, width = size
    z = vertices[:, 2]
    safe_z = np.where(z > NEAR, z, 1.0)
    uv = vertices[:, :2] / safe_z[:, None] * np.asarray(focal) + np.asarray(centre)
    corners = uv[faces]
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    # Pixel (i, j) has its centre at (i + 0.5, j + 0.5); a face covers the centres inside it.
    lo = np.ceil(corners.min(axis=1) - 0.5).astype(np.int64)
    hi = np.floor(corners.max(axis=1) - 0.5).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width - 1, height - 1])
    # Front faces wind clockwise on screen (y down) because the meshes wind counter-clockwise outwards.
    visible = (area2 < 0) & np.all(z[faces] > NEAR, axis=1) & np.all(hi >= lo, axis=1)
    face_ids = np.flatnonzero(visible)
    extent = hi[face_ids] - lo[face_ids] + 1
    size_class = np.ceil(np.log2(extent)).astype(np.int64)  # 1 px -> 0, 2 -> 1, 3..4 -> 2, ...
    group_key = size_class[:, 0] * 64 + size_class[:, 1]
    inverse_z = 1.0 / safe_z[faces]

    fragments_pixel, fragments_depth, fragments_face = [], [], []
    for key in np.unique(group_key):
        box_w, box_h = 1 << int(key // 64), 1 << int(key % 64)
        dx, dy = np.meshgrid(np.arange(box_w), np.arange(box_h))
        dx, dy = dx.ravel(), dy.ravel()
        members = face_ids[group_key == key]
        step = max(1, FRAGMENT_CHUNK // (box_w * box_h))
        for start in range(0, len(members), step):
            f = members[start : start + step]
            px = lo[f, 0, None] + dx
            py = lo[f, 1, None] + dy
            inside = (px <= hi[f, 0, None]) & (py <= hi[f, 1, None])
            sx, sy = px + 0.5, py + 0.5
            weights = []
            for first, second in ((b, c), (c, a), (a, b)):  # edge opposite each corner
                edge = (first[f, 0, None] - sx) * (second[f, 1, None] - sy) - (first[f, 1, None] - sy) * (
                    second[f, 0, None] - sx
                )
                weight = edge / area2[f, None]
                inside &= weight >= 0
                weights.append(weight)
            depth = sum(w * inverse_z[f, k, None] for k, w in enumerate(weights))
            fragments_pixel.append((py * width + px)[inside])
            fragments_depth.append(depth[inside])
            fragments_face.append(np.broadcast_to(f[:, None], inside.shape)[inside])

    face_buffer = np.full(height * width, -1, dtype=np.int64)
    if not fragments_pixel:
        return face_buffer, uv
    pixel = np.concatenate(fragments_pixel)
    depth = np.concatenate(fragments_depth)
    face = np.concatenate(fragments_face)
    nearest = np.zeros(height * width)
    np.maximum.at(nearest, pixel, depth)
    winner = depth == nearest[pixel]
    np.maximum.at(face_buffer, pixel[winner], face[winner])
    return face_buffer, uv


def _shade(
    face_buffer: np.ndarray,
    uv: np.ndarray,
    vertices: np.ndarray,
    normals: np.ndarray,
    faces: np.ndarray,
    face_colours: np.ndarray,
    background: np.ndarray,
) -> np.ndarray:
    """Lambert shading with normals interpolated perspective-correctly at each covered pixel centre."""
    height, width = background.shape[:2]
    out = background.reshape(-1, 3).astype(np.float32)
    pixels = np.flatnonzero(face_buffer >= 0)
    if len(pixels) == 0:
        return background.copy()
    face = face_buffer[pixels]
    corners = faces[face]
    p = np.stack([pixels % width + 0.5, pixels // width + 0.5], axis=1)
    a, b, c = (uv[corners[:, k]] for k in range(3))

    def cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]

    screen = np.stack([cross(b - p, c - p), cross(c - p, a - p), cross(a - p, b - p)], axis=1)
    perspective = screen / vertices[corners, 2]
    perspective /= perspective.sum(axis=1, keepdims=True)
    normal = np.einsum("pk,pkc->pc", perspective, normals[corners])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    intensity = AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT, 0.0, 1.0)
    out[pixels] = face_colours[face] * intensity[:, None].astype(np.float32)
    return out.reshape(height, width, 3).round().clip(0, 255).astype(np.uint8)


def _render(
    vertices: np.ndarray,
    normals: np.ndarray,
    faces: np.ndarray,
    face_colours: np.ndarray,
    focal: tuple[float, float],
    centre: tuple[float, float],
    background: np.ndarray,
) -> np.ndarray:
    face_buffer, uv = _rasterize(vertices, faces, focal, centre, background.shape[:2])
    return _shade(face_buffer, uv, vertices, normals, faces, face_colours, background)


def _side_view(
    vertices: np.ndarray, normals: np.ndarray, focal: tuple[float, float], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The scene turned 90 degrees about the vertical axis through its centroid, then moved to fill the panel.

    Seen from the image's right-hand side: depth in the photo runs left to right in the panel. The virtual
    camera keeps the focal length and looks down +z at the middle of the turned scene, just far enough back
    that every vertex lands inside `SIDE_MARGIN` of the panel.
    """
    height, width = size
    turn = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # x' = z, z' = -x
    turned = (vertices - vertices.mean(axis=0)) @ turn.T
    turned[:, :2] -= (turned[:, :2].min(axis=0) + turned[:, :2].max(axis=0)) / 2
    half = SIDE_MARGIN * np.array([width, height]) / 2
    needed = np.abs(turned[:, :2]) * (np.asarray(focal) / half) - turned[:, 2:]
    distance = max(float(needed.max()), float(NEAR - turned[:, 2].min()) + NEAR)
    turned[:, 2] += distance
    return turned, normals @ turn.T


def _draw_keypoints(
    panel: Image.Image, people: Sequence[Person], scale: tuple[float, float], colours: np.ndarray
) -> None:
    """Per person, far to near: box and dots in its colour; links green on the left, orange on the right, else blue."""
    draw = ImageDraw.Draw(panel)
    line_width = max(1, round(max(panel.size) / 500))
    radius = line_width + 1
    for index in np.argsort([-float(np.asarray(p["pred_cam_t"])[2]) for p in people], kind="stable"):  # far first
        person = people[index]
        colour = tuple(int(v) for v in colours[index])
        points = np.asarray(person["pred_keypoints_2d"], dtype=np.float64) * scale
        if "bbox" in person:
            x0, y0, x1, y1 = (np.asarray(person["bbox"], dtype=np.float64).reshape(2, 2) * scale).ravel()
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=line_width)
        for (start, end), link_colour in zip(MHR70_SKELETON, LINK_COLOURS):
            draw.line((*points[start], *points[end]), fill=link_colour, width=line_width)
        for x, y in points:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)


def visualization_png(
    image_rgb: np.ndarray,
    people: Sequence[Person],
    faces: np.ndarray,
    principal_point: tuple[float, float] | None = None,
    max_panel_size: int = MAX_PANEL_SIZE,
) -> bytes:
    """A 4-panel strip: input | 2D keypoints and skeletons | mesh overlay | side view of the meshes.

    Panels are the input size, scaled down so that their longer side is at most `max_panel_size`. The
    overlay projects the camera-space meshes with fx = fy = `focal_length` and the principal point (image
    centre unless given, in input pixels). Meshes are opaque, Lambert-shaded, one colour per person.
    """
    image = np.asarray(image_rgb, dtype=np.uint8)
    height, width = image.shape[:2]
    scale = min(1.0, max_panel_size / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    sx, sy = size[1] / width, size[0] / height
    panel = Image.fromarray(image).convert("RGB")
    if size != (height, width):
        panel = panel.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    base = np.asarray(panel)
    colours = person_colours(len(people))

    keypoints_panel = panel.copy()
    _draw_keypoints(keypoints_panel, people, (sx, sy), colours)

    overlay, side = base, np.full_like(base, BACKGROUND)
    if people:
        meshes = [camera_vertices(p) for p in people]
        faces = np.asarray(faces, dtype=np.int64)
        vertices = np.concatenate(meshes)
        all_faces = np.concatenate([faces + i * len(meshes[0]) for i in range(len(meshes))])
        normals = np.concatenate([vertex_normals(mesh, faces) for mesh in meshes]).astype(np.float64)
        face_colours = np.repeat(colours.astype(np.float32), len(faces), axis=0)
        fx, fy = _focal(people[0])
        focal = (fx * sx, fy * sy)
        cx, cy = principal_point if principal_point is not None else (width / 2, height / 2)
        overlay = _render(vertices, normals, all_faces, face_colours, focal, (cx * sx, cy * sy), base)
        turned, turned_normals = _side_view(vertices, normals, focal, size)
        side = _render(turned, turned_normals, all_faces, face_colours, focal, (size[1] / 2, size[0] / 2), side)
    strip = np.concatenate([base, np.asarray(keypoints_panel), overlay, side], axis=1)
    return png_bytes(Image.fromarray(strip))
