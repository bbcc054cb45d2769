"""Camera geometry of MoGe v1's `infer()`: view-plane UVs, the focal/shift recovery solver, intrinsics, unprojection.

The network predicts an affine-invariant point map (known up to a z-shift and a focal length). The shift and focal are
recovered by a 1-D Levenberg-Marquardt least-squares solve on a 64x64 nearest-resized copy of the map. The official code
calls `scipy.optimize.least_squares(fn, x0=0, ftol=1e-3, method='lm')`; ftol=1e-3 stops far from the optimum, so
matching it needs the very same iterates. `levenberg_marquardt_1d` is MINPACK's `lmder` specialised to one unknown,
driven by scipy's forward-difference Jacobian, which reproduces those iterates without depending on scipy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

SOLVER_DOWNSAMPLE_SIZE = (64, 64)
_EPS = float(np.finfo(np.float64).eps)
_DWARF = float(np.finfo(np.float64).tiny)


def normalized_view_plane_uv(
    width: int, height: int, aspect_ratio: float | None = None, dtype: torch.dtype | None = None, device=None
) -> torch.Tensor:
    """(H, W, 2) pixel-centre offsets from the image centre divided by half the diagonal (u right, v down)."""
    if aspect_ratio is None:
        aspect_ratio = width / height
    span_x = aspect_ratio / (1 + aspect_ratio**2) ** 0.5
    span_y = 1 / (1 + aspect_ratio**2) ** 0.5
    u = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=dtype, device=device)
    v = torch.linspace(
        -span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=dtype, device=device
    )
    u, v = torch.meshgrid(u, v, indexing="xy")
    return torch.stack([u, v], dim=-1)


def _forward_difference_jacobian(fun: Callable[[np.ndarray], np.ndarray], x: np.ndarray, f0: np.ndarray) -> np.ndarray:
    """scipy's '2-point' `approx_derivative` for one float64 unknown: step sqrt(eps)·max(1, |x|), sign(0) = +1."""
    step = _EPS**0.5 * (1.0 if x[0] >= 0 else -1.0) * max(1.0, abs(float(x[0])))
    x1 = x.copy()
    x1[0] = x[0] + step
    return (fun(x1) - f0) / ((x[0] + step) - x[0])


def levenberg_marquardt_1d(
    fun: Callable[[np.ndarray], np.ndarray],
    x0: float = 0.0,
    ftol: float = 1e-3,
    xtol: float = 1e-8,
    gtol: float = 1e-8,
    max_nfev: int = 100,
    factor: float = 100.0,
) -> float:
    """Minimise ||fun(x)||² over a scalar x with MINPACK `lmder` (mode 1: Jacobian-norm scaling), as scipy's 'lm'."""
    x = np.array([x0], dtype=np.float64)
    fvec = fun(x)
    nfev = 1
    fnorm = float(np.linalg.norm(fvec))
    par = 0.0
    first = True
    diag = delta = xnorm = 0.0
    while True:
        jac = _forward_difference_jacobian(fun, x, fvec)
        # Householder QR of the single column: R = rdiag, Qᵀf's first entry = qtf.
        acnorm = float(np.linalg.norm(jac))
        ajnorm = -acnorm if jac[0] < 0 else acnorm
        if ajnorm != 0:
            house = jac / ajnorm
            house[0] += 1.0
            qtf = float(fvec[0] - house[0] * (float(np.dot(house, fvec)) / house[0]))
        else:
            qtf = float(fvec[0])
        rdiag = -ajnorm
        if first:
            diag = acnorm if acnorm != 0 else 1.0
            xnorm = abs(diag * float(x[0]))
            delta = factor * xnorm or factor
        gnorm = abs(rdiag * (qtf / fnorm) / acnorm) if fnorm != 0 and acnorm != 0 else 0.0
        if gnorm <= gtol:
            return float(x[0])
        diag = max(diag, acnorm)
        while True:
            par, step = _lm_parameter(rdiag, diag, qtf, delta, par)
            step = -step
            x_new = x + step
            pnorm = abs(diag * step)
            if first:
                delta = min(delta, pnorm)
            fvec_new = fun(x_new)
            nfev += 1
            fnorm1 = float(np.linalg.norm(fvec_new))
            actred = 1.0 - (fnorm1 / fnorm) ** 2 if 0.1 * fnorm1 < fnorm else -1.0
            temp1 = abs(rdiag * step) / fnorm
            temp2 = (par**0.5 * pnorm) / fnorm
            prered = temp1**2 + temp2**2 / 0.5
            dirder = -(temp1**2 + temp2**2)
            ratio = actred / prered if prered != 0 else 0.0
            if ratio <= 0.25:
                temp = 0.5 if actred >= 0 else 0.5 * dirder / (dirder + 0.5 * actred)
                if 0.1 * fnorm1 >= fnorm or temp < 0.1:
                    temp = 0.1
                delta = temp * min(delta, pnorm / 0.1)
                par = par / temp
            elif par == 0 or ratio >= 0.75:
                delta = pnorm / 0.5
                par = 0.5 * par
            if ratio >= 1e-4:
                x, fvec, fnorm = x_new, fvec_new, fnorm1
                xnorm = abs(diag * float(x[0]))
                first = False
            converged = (abs(actred) <= ftol and prered <= ftol and 0.5 * ratio <= 1) or delta <= xtol * xnorm
            stalled = (
                nfev >= max_nfev
                or (abs(actred) <= _EPS and prered <= _EPS and 0.5 * ratio <= 1)
                or delta <= _EPS * xnorm
                or gnorm <= _EPS
            )
            if converged or stalled:
                return float(x[0])
            if ratio >= 1e-4:
                break


def _lm_parameter(rdiag: float, diag: float, qtf: float, delta: float, par: float) -> tuple[float, float]:
    """MINPACK `lmpar` for one unknown: the LM parameter and step with |diag·step| ≈ delta (within 10%)."""
    x = qtf / rdiag if rdiag != 0 else 0.0
    dxnorm = abs(diag * x)
    fp = dxnorm - delta
    if fp <= 0.1 * delta:
        return 0.0, x
    parl = 0.0
    if rdiag != 0:
        temp = abs(diag * (diag * x / dxnorm) / rdiag)
        parl = ((fp / delta) / temp) / temp
    gnorm = abs(rdiag * qtf / diag)
    paru = gnorm / delta
    if paru == 0:
        paru = _DWARF / min(delta, 0.1)
    par = min(max(par, parl), paru)
    if par == 0:
        par = gnorm / dxnorm
    for iteration in range(1, 11):
        if par == 0:
            par = max(_DWARF, 0.001 * paru)
        x, sdiag = _damped_solve(rdiag, par**0.5 * diag, qtf)
        dxnorm = abs(diag * x)
        previous_fp, fp = fp, dxnorm - delta
        if abs(fp) <= 0.1 * delta or (parl == 0 and fp <= previous_fp < 0) or iteration == 10:
            break
        temp = abs(diag * (diag * x / dxnorm) / sdiag)
        parc = ((fp / delta) / temp) / temp
        if fp > 0:
            parl = max(parl, par)
        if fp < 0:
            paru = min(paru, par)
        par = max(parl, par + parc)
    return par, x


def _damped_solve(rdiag: float, damping: float, qtf: float) -> tuple[float, float]:
    """MINPACK `qrsolv` for one unknown: solve [R; damping]·x ≈ [qtf; 0] with a Givens rotation; also its new R."""
    if damping == 0:
        return (qtf / rdiag if rdiag != 0 else 0.0), rdiag
    if abs(rdiag) < abs(damping):
        cotan = rdiag / damping
        sin = 0.5 / (0.25 + 0.25 * cotan**2) ** 0.5
        cos = sin * cotan
    else:
        tan = damping / rdiag
        cos = 0.5 / (0.25 + 0.25 * tan**2) ** 0.5
        sin = cos * tan
    sdiag = cos * rdiag + sin * damping
    return ((cos * qtf) / sdiag if sdiag != 0 else 0.0), sdiag


def solve_optimal_focal_shift(uv: np.ndarray, xyz: np.ndarray) -> tuple[np.float32, np.float32]:
    """Shift minimising |f(shift)·xy/(z+shift) − uv| with the closed-form best focal f; (shift, focal), float32."""
    uv, xy, z = uv.reshape(-1, 2), xyz[..., :2].reshape(-1, 2), xyz[..., 2].reshape(-1)

    def residual(shift: np.ndarray) -> np.ndarray:
        xy_proj = xy / (z + shift)[:, None]
        focal = (xy_proj * uv).sum() / np.square(xy_proj).sum()
        return (focal * xy_proj - uv).ravel()

    shift = np.float32(levenberg_marquardt_1d(residual))
    xy_proj = xy / (z + shift)[:, None]
    return shift, (xy_proj * uv).sum() / np.square(xy_proj).sum()


def solve_optimal_shift(uv: np.ndarray, xyz: np.ndarray, focal: np.float32) -> np.float32:
    """Shift minimising |focal·xy/(z+shift) − uv| for a known focal; float32."""
    uv, xy, z = uv.reshape(-1, 2), xyz[..., :2].reshape(-1, 2), xyz[..., 2].reshape(-1)

    def residual(shift: np.ndarray) -> np.ndarray:
        return (focal * (xy / (z + shift)[:, None]) - uv).ravel()

    return np.float32(levenberg_marquardt_1d(residual))


def recover_focal_shift(
    points: torch.Tensor, mask: torch.Tensor, focal: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal (relative to half the diagonal) and z-shift of a (B, H, W, 3) affine-invariant point map.

    Points, view-plane UVs and the mask are nearest-resized to 64x64; the masked entries feed the solver (on the CPU,
    per image). With fewer than two valid entries the result is focal 1, shift 0. A given `focal` (B,) is kept.
    """
    batch, height, width = points.shape[:3]
    uv = normalized_view_plane_uv(width, height, dtype=points.dtype, device=points.device)
    points_lr = F.interpolate(points.permute(0, 3, 1, 2), SOLVER_DOWNSAMPLE_SIZE, mode="nearest").permute(0, 2, 3, 1)
    uv_lr = F.interpolate(uv.permute(2, 0, 1)[None], SOLVER_DOWNSAMPLE_SIZE, mode="nearest")[0].permute(1, 2, 0)
    mask_lr = F.interpolate(mask.float()[:, None], SOLVER_DOWNSAMPLE_SIZE, mode="nearest")[:, 0] > 0
    points_np, uv_np, mask_np = points_lr.cpu().numpy(), uv_lr.cpu().numpy(), mask_lr.cpu().numpy()
    focal_np = None if focal is None else focal.cpu().numpy()

    shifts, focals = [], []
    for i in range(batch):
        xyz_i, uv_i = points_np[i][mask_np[i]], uv_np[mask_np[i]]
        if uv_i.shape[0] < 2:
            shifts.append(0.0)
            focals.append(1.0)
        elif focal_np is None:
            shift_i, focal_i = solve_optimal_focal_shift(uv_i, xyz_i)
            shifts.append(float(shift_i))
            focals.append(float(focal_i))
        else:
            shifts.append(float(solve_optimal_shift(uv_i, xyz_i, focal_np[i])))
    shift = torch.tensor(shifts, dtype=points.dtype, device=points.device)
    if focal is None:
        focal = torch.tensor(focals, dtype=points.dtype, device=points.device)
    return focal, shift


def intrinsics_from_focal_center(fx: torch.Tensor, fy: torch.Tensor, cx: float, cy: float) -> torch.Tensor:
    """(B, 3, 3) OpenCV intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] from (B,) focals."""
    zeros, ones = torch.zeros_like(fx), torch.ones_like(fx)
    cx_t, cy_t = torch.full_like(fx, cx), torch.full_like(fx, cy)
    return torch.stack([fx, zeros, cx_t, zeros, fy, cy_t, zeros, zeros, ones], dim=-1).unflatten(-1, (3, 3))


def depth_to_points(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Unproject a (B, H, W) depth map through normalised (B, 3, 3) intrinsics at pixel centres -> (B, H, W, 3)."""
    height, width = depth.shape[-2:]
    u = torch.linspace(0.5 / width, (width - 0.5) / width, width, dtype=depth.dtype, device=depth.device)
    v = torch.linspace(0.5 / height, (height - 0.5) / height, height, dtype=depth.dtype, device=depth.device)
    uv = torch.stack(torch.meshgrid(u, v, indexing="xy"), dim=-1)
    rays = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1) @ torch.inverse(intrinsics[:, None]).transpose(-2, -1)
    return rays * depth[..., None]
