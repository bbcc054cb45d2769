"""Triangle-mesh files written from their specifications: glTF 2.0 binary (GLB) and binary PLY.

Only numpy is needed. The GLB writer emits one scene with one node (and one mesh) per `MeshNode`,
with POSITION (min/max), smooth NORMALs, optional COLOR_0 and UNSIGNED_INT indices, every chunk and
bufferView 4-byte aligned as the spec requires.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

GLB_MAGIC = 0x46546C67  # b"glTF"
GLB_VERSION = 2
CHUNK_JSON = 0x4E4F534A  # b"JSON"
CHUNK_BIN = 0x004E4942  # b"BIN\0"

FLOAT = 5126
UNSIGNED_BYTE = 5121
UNSIGNED_INT = 5125
ARRAY_BUFFER = 34962
ELEMENT_ARRAY_BUFFER = 34963

PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "<i2",
    "int16": "<i2",
    "ushort": "<u2",
    "uint16": "<u2",
    "int": "<i4",
    "int32": "<i4",
    "uint": "<u4",
    "uint32": "<u4",
    "float": "<f4",
    "float32": "<f4",
    "double": "<f8",
    "float64": "<f8",
}


@dataclass
class MeshNode:
    """One named triangle mesh of a GLB scene; `colors` are uint8 RGB or RGBA per vertex."""

    name: str
    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray | None = None
    translation: np.ndarray | None = None


@dataclass
class PlyMesh:
    vertices: np.ndarray  # (V, 3) float32
    faces: np.ndarray  # (F, 3) int64
    colors: np.ndarray | None  # (V, 3 or 4) uint8


def opencv_to_gltf(points: np.ndarray) -> np.ndarray:
    """OpenCV camera axes (x right, y down, z forward) to glTF's (y up, camera looking down -z): flip y and z.

    This is a 180-degree rotation about x, so triangle winding (and outward normals) is preserved.
    """
    return np.asarray(points) * np.array([1, -1, -1], dtype=np.asarray(points).dtype)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit smooth vertex normals: sums of the area-weighted normals of the faces around each vertex.

    Vertices touched by no face (or only degenerate ones) get +z, so that every normal is unit length.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    face_normals = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    sums = np.zeros_like(v)
    for corner in range(3):
        np.add.at(sums, f[:, corner], face_normals)
    lengths = np.linalg.norm(sums, axis=1, keepdims=True)
    normals = np.divide(sums, lengths, out=np.zeros_like(sums), where=lengths > 0)
    normals[lengths[:, 0] == 0] = (0.0, 0.0, 1.0)
    return normals.astype(np.float32)


def _write(path_or_file: str | Path | BinaryIO, data: bytes) -> None:
    if isinstance(path_or_file, str | Path):
        Path(path_or_file).write_bytes(data)
    else:
        path_or_file.write(data)


def _read(path_or_file: str | Path | BinaryIO | bytes) -> bytes:
    if isinstance(path_or_file, bytes):
        return path_or_file
    if isinstance(path_or_file, str | Path):
        return Path(path_or_file).read_bytes()
    return path_or_file.read()


def _pad4(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


class _BinBuilder:
    """Accumulates the BIN chunk: one 4-byte aligned bufferView (and one accessor) per array."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.length = 0
        self.buffer_views: list[dict] = []
        self.accessors: list[dict] = []

    def add(self, data: np.ndarray, accessor: dict, target: int, stride: int | None = None) -> int:
        raw = np.ascontiguousarray(data).tobytes()
        view = {"buffer": 0, "byteOffset": self.length, "byteLength": len(raw), "target": target}
        if stride is not None:
            view["byteStride"] = stride
        self.buffer_views.append(view)
        padded = _pad4(raw, b"\x00")
        self.parts.append(padded)
        self.length += len(padded)
        self.accessors.append({"bufferView": len(self.buffer_views) - 1, **accessor})
        return len(self.accessors) - 1


def _colors_accessor(bins: _BinBuilder, colors: np.ndarray, count: int) -> int:
    """COLOR_0 as normalized unsigned bytes; RGB is stored with a 4-byte stride (vertex attributes must align)."""
    colors = np.asarray(colors)
    if colors.dtype != np.uint8 or colors.shape not in ((count, 3), (count, 4)):
        raise ValueError(f"colors must be uint8 ({count}, 3) or ({count}, 4), got {colors.dtype} {colors.shape}")
    channels = colors.shape[1]
    padded = np.zeros((count, 4), dtype=np.uint8)
    padded[:, :channels] = colors
    accessor = {"componentType": UNSIGNED_BYTE, "normalized": True, "count": count, "type": f"VEC{channels}"}
    return bins.add(padded, accessor, ARRAY_BUFFER, stride=4)


def write_glb(path_or_file: str | Path | BinaryIO, nodes: list[MeshNode]) -> None:
    """One glTF 2.0 binary: a scene with one node (named, own mesh, optional translation) per `MeshNode`.

    With no nodes the file holds an empty scene and no BIN chunk (a glTF buffer may not be empty).
    """
    bins = _BinBuilder()
    meshes: list[dict] = []
    gltf_nodes: list[dict] = []
    for index, node in enumerate(nodes):
        vertices = np.asarray(node.vertices, dtype=np.float32)
        faces = np.asarray(node.faces)
        if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
            raise ValueError(f"node {node.name!r}: vertices must be (V, 3) and faces (F, 3)")
        if len(vertices) == 0 or len(faces) == 0:
            raise ValueError(f"node {node.name!r} has no vertices or no faces")
        if faces.min() < 0 or faces.max() >= len(vertices):
            raise ValueError(f"node {node.name!r}: face index out of range")
        count = len(vertices)
        attributes = {
            "POSITION": bins.add(
                vertices,
                {
                    "componentType": FLOAT,
                    "count": count,
                    "type": "VEC3",
                    "min": vertices.min(axis=0).tolist(),
                    "max": vertices.max(axis=0).tolist(),
                },
                ARRAY_BUFFER,
            ),
            "NORMAL": bins.add(
                vertex_normals(vertices, faces), {"componentType": FLOAT, "count": count, "type": "VEC3"}, ARRAY_BUFFER
            ),
        }
        if node.colors is not None:
            attributes["COLOR_0"] = _colors_accessor(bins, node.colors, count)
        indices = bins.add(
            faces.astype(np.uint32),
            {"componentType": UNSIGNED_INT, "count": faces.size, "type": "SCALAR"},
            ELEMENT_ARRAY_BUFFER,
        )
        meshes.append(
            {
                "name": node.name,
                "primitives": [{"attributes": attributes, "indices": indices, "material": 0, "mode": 4}],
            }
        )
        gltf_node: dict = {"name": node.name, "mesh": index}
        if node.translation is not None:
            gltf_node["translation"] = [float(t) for t in np.asarray(node.translation).reshape(3)]
        gltf_nodes.append(gltf_node)

    document: dict = {
        "asset": {"version": "2.0", "generator": "sam3-serve"},
        "scene": 0,
        "scenes": [{"nodes": list(range(len(nodes)))} if nodes else {}],
    }
    if nodes:
        document |= {
            "nodes": gltf_nodes,
            "meshes": meshes,
            "materials": [
                {
                    "name": "default",
                    "pbrMetallicRoughness": {"metallicFactor": 0, "roughnessFactor": 1},  # matte, not metal
                }
            ],
            "accessors": bins.accessors,
            "bufferViews": bins.buffer_views,
            "buffers": [{"byteLength": bins.length}],
        }
    json_chunk = _pad4(json.dumps(document, separators=(",", ":")).encode(), b" ")
    chunks = [struct.pack("<II", len(json_chunk), CHUNK_JSON) + json_chunk]
    if nodes:
        chunks.append(struct.pack("<II", bins.length, CHUNK_BIN) + b"".join(bins.parts))
    body = b"".join(chunks)
    _write(path_or_file, struct.pack("<III", GLB_MAGIC, GLB_VERSION, 12 + len(body)) + body)


def glb_bytes(nodes: list[MeshNode]) -> bytes:
    buffer = io.BytesIO()
    write_glb(buffer, nodes)
    return buffer.getvalue()


def write_ply(
    path_or_file: str | Path | BinaryIO, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None
) -> None:
    """Binary little-endian PLY: float x, y, z (+ uchar red, green, blue[, alpha]) and uchar/int face lists."""
    vertices = np.asarray(vertices, dtype=np.float32)
    faces = np.asarray(faces)
    properties = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        colors = np.asarray(colors)
        if colors.dtype != np.uint8 or colors.shape not in ((len(vertices), 3), (len(vertices), 4)):
            raise ValueError("colors must be uint8 (V, 3) or (V, 4)")
        properties += [(name, "u1") for name in ("red", "green", "blue", "alpha")[: colors.shape[1]]]
    vertex_rows = np.empty(len(vertices), dtype=properties)
    for axis, name in enumerate("xyz"):
        vertex_rows[name] = vertices[:, axis]
    if colors is not None:
        for channel, (name, _) in enumerate(properties[3:]):
            vertex_rows[name] = colors[:, channel]
    face_rows = np.empty(len(faces), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    face_rows["n"] = 3
    face_rows["i"] = faces
    header = ["ply", "format binary_little_endian 1.0", "comment sam3-serve", f"element vertex {len(vertices)}"]
    header += [f"property {'float' if kind == '<f4' else 'uchar'} {name}" for name, kind in properties]
    header += [f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    _write(path_or_file, ("\n".join(header) + "\n").encode("ascii") + vertex_rows.tobytes() + face_rows.tobytes())


def read_ply(path_or_file: str | Path | BinaryIO | bytes) -> PlyMesh:
    """Reads a binary little-endian triangle PLY (any scalar vertex properties, one face list property)."""
    data = _read(path_or_file)
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError("not a PLY file")
    body_start = data.index(b"\n", end) + 1
    elements: list[tuple[str, int, list[tuple[str, ...]]]] = []
    for line in data[:end].decode("ascii").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and words[1] != "binary_little_endian":
            raise ValueError(f"unsupported PLY format {words[1]}")
        if words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            elements[-1][2].append(tuple(words[1:]))
    offset = body_start
    vertex_rows = face_rows = None
    for name, count, properties in elements:
        if any(prop[0] == "list" for prop in properties):
            if len(properties) != 1:
                raise ValueError("face elements with more than the index list are not supported")
            _, count_type, index_type, _ = properties[0]
            row = np.dtype([("n", PLY_TYPES[count_type]), ("i", PLY_TYPES[index_type], (3,))])
        else:
            row = np.dtype([(prop[1], PLY_TYPES[prop[0]]) for prop in properties])
        rows = np.frombuffer(data, dtype=row, count=count, offset=offset)
        offset += count * row.itemsize
        if name == "vertex":
            vertex_rows = rows
        elif name == "face":
            if np.any(rows["n"] != 3):
                raise ValueError("only triangle faces are supported")
            face_rows = rows
    if vertex_rows is None or face_rows is None:
        raise ValueError("PLY has no vertex or no face element")
    vertices = np.stack([vertex_rows[axis] for axis in "xyz"], axis=1).astype(np.float32)
    channels = [c for c in ("red", "green", "blue", "alpha") if c in vertex_rows.dtype.names]
    colors = np.stack([vertex_rows[c] for c in channels], axis=1).astype(np.uint8) if channels else None
    return PlyMesh(vertices, face_rows["i"].astype(np.int64), colors)
