"""From the decoder's continuous pose vector to MHR model parameters.

The network regresses rotations in continuous forms (6D for 3-DoF joints, (sin, cos) for 1-DoF
ones) and MHR takes Euler angles. The index tables place each converted value at its slot of
MHR's 133 body parameters; they are facts of the MHR rig as SAM 3D Body uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# 23 three-DoF joints: the body-parameter slots of their X, Y, Z Euler angles.
# fmt: off
BODY_3DOF_SLOTS = [
    (0, 2, 4), (6, 8, 10), (12, 13, 14), (15, 16, 17), (18, 19, 20), (21, 22, 23), (24, 25, 26), (27, 28, 29),
    (34, 35, 36), (37, 38, 39), (44, 45, 46), (53, 54, 55), (64, 65, 66), (85, 69, 73), (86, 70, 79), (87, 71, 82),
    (88, 72, 76), (91, 92, 93), (112, 96, 100), (113, 97, 106), (114, 98, 109), (115, 99, 103), (130, 131, 132),
]
BODY_1DOF_SLOTS = [
    1, 3, 5, 7, 9, 11, 30, 31, 32, 33, 40, 41, 42, 43, 47, 48, 49, 50, 51, 52, 56, 57, 58, 59, 60, 61, 62, 63, 67, 68,
    74, 75, 77, 78, 80, 81, 83, 84, 89, 90, 94, 95, 101, 102, 104, 105, 107, 108, 110, 111, 116, 117, 118, 119, 120,
    121, 122, 123,
]
# fmt: on
BODY_TRANSLATION_SLOTS = [124, 125, 126, 127, 128, 129]
NUM_BODY_PARAMS = 133
BODY_CONT_DIM = 6 * len(BODY_3DOF_SLOTS) + 2 * len(BODY_1DOF_SLOTS) + len(BODY_TRANSLATION_SLOTS)  # 260
# Body-parameter slots driven by the hand model (finger joints), zeroed in the body prediction.
BODY_HAND_SLOTS = list(range(62, 116))
# Degrees of freedom of the 16 hand joints, in joint order (27 Euler angles in all).
HAND_JOINT_DOFS = [3, 1, 1, 3, 1, 1, 3, 1, 1, 3, 1, 1, 2, 3, 1, 1]
HAND_CONT_DIM = 54


def rot6d_to_rotmat(x: torch.Tensor) -> torch.Tensor:
    """[B, 6] -> [B, 3, 3]; columns a1 = x[0:3], a2 = x[3:6] orthonormalised by Gram-Schmidt."""
    a = x.reshape(-1, 2, 3)
    b1 = F.normalize(a[:, 0], dim=-1)
    a2 = a[:, 1]
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2)
    return torch.stack((b1, b2, b3), dim=-1)


def euler_xyz_from_6d(x: torch.Tensor) -> torch.Tensor:
    """[..., 6] (two columns) -> [..., 3] XYZ Euler angles of the rotation they span.

    The third column is x-cross-y (not Gram-Schmidt on the second), as the rig was trained; the
    singular branch (cos(y) ~ 0) follows the same convention.
    """
    col_x = F.normalize(x[..., :3], dim=-1)
    col_z = F.normalize(torch.cross(col_x, x[..., 3:], dim=-1), dim=-1)
    col_y = torch.cross(col_z, col_x, dim=-1)
    m = torch.stack([col_x, col_y, col_z], dim=-1)
    sy = torch.sqrt(m[..., 0, 0] ** 2 + m[..., 1, 0] ** 2)
    singular = (sy < 1e-6).to(x.dtype)
    ax = torch.atan2(m[..., 2, 1], m[..., 2, 2]) * (1 - singular) + torch.atan2(-m[..., 1, 2], m[..., 1, 1]) * singular
    ay = torch.atan2(-m[..., 2, 0], sy)
    az = torch.atan2(m[..., 1, 0], m[..., 0, 0]) * (1 - singular)
    return torch.stack([ax, ay, az], dim=-1)


def body_params_from_cont(cont: torch.Tensor) -> torch.Tensor:
    """[B, 260] continuous body pose -> [B, 133] MHR body parameters."""
    n3 = 6 * len(BODY_3DOF_SLOTS)
    n1 = 2 * len(BODY_1DOF_SLOTS)
    three = euler_xyz_from_6d(cont[..., :n3].unflatten(-1, (-1, 6))).flatten(-2)
    sincos = cont[..., n3 : n3 + n1].unflatten(-1, (-1, 2))
    one = torch.atan2(sincos[..., 0], sincos[..., 1])
    params = cont.new_zeros(*cont.shape[:-1], NUM_BODY_PARAMS)
    params[..., [s for slots in BODY_3DOF_SLOTS for s in slots]] = three
    params[..., BODY_1DOF_SLOTS] = one
    params[..., BODY_TRANSLATION_SLOTS] = cont[..., n3 + n1 :]
    return params


def _slots(per_joint: int, dofs: tuple[int, ...]) -> list[int]:
    """Positions, in joint order with `per_joint` values per degree of freedom, of the joints with `dofs`."""
    flags = [d in dofs for d in HAND_JOINT_DOFS for _ in range(per_joint * d)]
    return [i for i, flag in enumerate(flags) if flag]


# Where the 3-DoF (6D) and the 1-/2-DoF (sin, cos) joints sit in the 54 continuous and 27 Euler values.
HAND_CONT_3DOF, HAND_CONT_1DOF = _slots(2, (3,)), _slots(2, (1, 2))
HAND_PARAM_3DOF, HAND_PARAM_1DOF = _slots(1, (3,)), _slots(1, (1, 2))


def hand_params_from_cont(cont: torch.Tensor) -> torch.Tensor:
    """[B, 54] continuous hand pose -> [B, 27] Euler angles, joint by joint.

    3-DoF joints use 6D; 1- and 2-DoF joints use one (sin, cos) pair per angle.
    """
    three = euler_xyz_from_6d(cont[..., HAND_CONT_3DOF].unflatten(-1, (-1, 6))).flatten(-2)
    sincos = cont[..., HAND_CONT_1DOF].unflatten(-1, (-1, 2))
    params = cont.new_zeros(*cont.shape[:-1], sum(HAND_JOINT_DOFS))
    params[..., HAND_PARAM_3DOF] = three
    params[..., HAND_PARAM_1DOF] = torch.atan2(sincos[..., 0], sincos[..., 1])
    return params
