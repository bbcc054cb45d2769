"""FlexiCubes surface extraction (inference path), after NVIDIA's FlexiCubes as used by TRELLIS / SAM 3D Objects.

Dual marching cubes with learned weights: every surface cube emits one dual vertex per edge group of its DMC case
(a beta-weighted mean of the alpha-weighted zero crossings on the group's edges), and every surface edge shared by four
cubes becomes a quad of their dual vertices, split into two triangles along the diagonal with the larger gamma product.
Cubes are given sparsely: `cube_idx` rows must be sorted by linear cube index and vertex indices must follow the linear
vertex order, so that edge uniquing and vertex numbering match the official dense-grid code exactly.
"""

from __future__ import annotations

import torch

CUBE_CORNERS = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]])
# Corner pairs of the 12 cube edges.
CUBE_EDGES = torch.tensor([0, 1, 1, 5, 4, 5, 0, 4, 2, 3, 3, 7, 6, 7, 2, 6, 2, 0, 3, 1, 7, 5, 6, 4])
# Dual marching cubes table: per case (corner occupancy bits), comma-separated edge groups, edges as hex digits.
DMC_GROUPS = (
    "",
    "038",
    "019",
    "1389",
    "478",
    "0347",
    "019,478",
    "13479",
    "459",
    "038,459",
    "0145",
    "13458",
    "5789",
    "03579",
    "01578",
    "1357",
    "23b",
    "028b",
    "019,23b",
    "1289b",
    "478,23b",
    "0247b",
    "019,478,23b",
    "12479b",
    "459,23b",
    "028b,459",
    "0145,23b",
    "12458b",
    "5789,23b",
    "02579b",
    "01578,23b",
    "1257b",
    "12a",
    "038,12a",
    "029a",
    "2389a",
    "478,12a",
    "0347,12a",
    "029a,478",
    "23479a",
    "459,12a",
    "038,459,12a",
    "0245a",
    "23458a",
    "5789,12a",
    "03579,12a",
    "02578a",
    "2357a",
    "13ab",
    "018ab",
    "039ab",
    "89ab",
    "478,13ab",
    "0147ab",
    "039ab,478",
    "479ab",
    "459,13ab",
    "018ab,459",
    "0345ab",
    "458ab",
    "5789,13ab",
    "01579ab",
    "03578ab",
    "57ab",
    "67b",
    "038,67b",
    "019,67b",
    "1389,67b",
    "468b",
    "0346b",
    "019,468b",
    "13469b",
    "459,67b",
    "038,459,67b",
    "0145,67b",
    "13458,67b",
    "5689b",
    "03569b",
    "01568b",
    "1356b",
    "2367",
    "02678",
    "019,2367",
    "126789",
    "23468",
    "0246",
    "019,23468",
    "12469",
    "459,2367",
    "02678,459",
    "0145,2367",
    "1245678",
    "235689",
    "02569",
    "0123568",
    "1256",
    "12a,67b",
    "038,12a,67b",
    "029a,67b",
    "2389a,67b",
    "468b,12a",
    "0346b,12a",
    "029a,468b",
    "23469ab",
    "459,12a,67b",
    "038,459,12a,67b",
    "0245a,67b",
    "23458a,67b",
    "5689b,12a",
    "03569b,12a",
    "02568ab",
    "2356ab",
    "1367a",
    "01678a",
    "03679a",
    "6789a",
    "13468a",
    "0146a",
    "034689a",
    "469a",
    "459,1367a",
    "01678a,459",
    "034567a",
    "45678a",
    "135689a",
    "01569a",
    "038,56a",
    "56a",
    "56a",
    "038,56a",
    "019,56a",
    "1389,56a",
    "478,56a",
    "0347,56a",
    "019,478,56a",
    "13479,56a",
    "469a",
    "038,469a",
    "0146a",
    "13468a",
    "6789a",
    "03679a",
    "01678a",
    "1367a",
    "23b,56a",
    "028b,56a",
    "019,23b,56a",
    "1289b,56a",
    "478,23b,56a",
    "0247b,56a",
    "019,478,23b,56a",
    "12479b,56a",
    "469a,23b",
    "028b,469a",
    "0146a,23b",
    "12468ab",
    "6789a,23b",
    "02679ab",
    "01678a,23b",
    "1267ab",
    "1256",
    "038,1256",
    "02569",
    "235689",
    "478,1256",
    "0347,1256",
    "02569,478",
    "2345679",
    "12469",
    "038,12469",
    "0246",
    "23468",
    "126789",
    "0123679",
    "02678",
    "2367",
    "1356b",
    "01568b",
    "03569b",
    "5689b",
    "478,1356b",
    "014567b",
    "03569b,478",
    "45679b",
    "13469b",
    "014689b",
    "0346b",
    "468b",
    "136789b",
    "019,67b",
    "03678b",
    "67b",
    "57ab",
    "038,57ab",
    "019,57ab",
    "1389,57ab",
    "458ab",
    "0345ab",
    "019,458ab",
    "13459ab",
    "479ab",
    "038,479ab",
    "0147ab",
    "13478ab",
    "89ab",
    "039ab",
    "018ab",
    "13ab",
    "2357a",
    "02578a",
    "019,2357a",
    "125789a",
    "23458a",
    "0245a",
    "019,23458a",
    "12459a",
    "23479a",
    "024789a",
    "012347a",
    "478,12a",
    "2389a",
    "029a",
    "01238a",
    "12a",
    "1257b",
    "038,1257b",
    "02579b",
    "235789b",
    "12458b",
    "012345b",
    "024589b",
    "459,23b",
    "12479b",
    "038,12479b",
    "0247b",
    "23478b",
    "1289b",
    "01239b",
    "028b",
    "23b",
    "1357",
    "01578",
    "03579",
    "5789",
    "13458",
    "0145",
    "034589",
    "459",
    "13479",
    "014789",
    "0347",
    "478",
    "1389",
    "019",
    "038",
    "",
)
# Ambiguous cases (C16/C19): case → (direction to the neighbour sharing the ambiguous face, inverted case).
CHECK_TABLE = {
    61: (1, 0, 0, 194),
    62: (-1, 0, 0, 193),
    91: (0, 1, 0, 164),
    94: (0, -1, 0, 161),
    103: (0, 0, 1, 152),
    110: (0, 0, 1, 145),
    111: (0, 0, 1, 144),
    118: (0, 0, -1, 137),
    122: (0, 1, 0, 133),
    123: (0, 1, 0, 132),
    124: (1, 0, 0, 131),
    125: (1, 0, 0, 130),
    155: (0, 0, 1, 100),
    157: (0, 0, 1, 98),
    159: (0, 0, 1, 96),
    167: (0, 1, 0, 88),
    173: (0, -1, 0, 82),
    181: (0, 1, 0, 74),
    183: (0, 1, 0, 72),
    185: (0, 0, -1, 70),
    188: (-1, 0, 0, 67),
    190: (-1, 0, 0, 65),
    199: (1, 0, 0, 56),
    203: (-1, 0, 0, 52),
    211: (1, 0, 0, 44),
    215: (1, 0, 0, 40),
    217: (0, 0, -1, 38),
    218: (0, -1, 0, 37),
    222: (0, -1, 0, 33),
    227: (-1, 0, 0, 28),
    229: (0, -1, 0, 26),
    230: (0, 0, -1, 25),
    235: (-1, 0, 0, 20),
    237: (0, -1, 0, 18),
    246: (0, 0, -1, 9),
    249: (0, 0, -1, 6),
}
_QUAD_SPLIT_1 = [0, 1, 2, 0, 2, 3]
_QUAD_SPLIT_2 = [0, 1, 3, 3, 1, 2]


def _dmc_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(256, 4, 7) edge ids padded with -1, and the (256,) number of dual vertices per case."""
    table = torch.full((256, 4, 7), -1, dtype=torch.long)
    counts = torch.zeros(256, dtype=torch.long)
    for case, text in enumerate(DMC_GROUPS):
        groups = text.split(",") if text else []
        counts[case] = len(groups)
        for g, group in enumerate(groups):
            table[case, g, : len(group)] = torch.tensor([int(e, 16) for e in group])
    return table, counts


def _check_table() -> torch.Tensor:
    """(256, 5) rows [is_ambiguous, dx, dy, dz, inverted_case] (zeros for unambiguous cases)."""
    table = torch.zeros(256, 5, dtype=torch.long)
    for case, row in CHECK_TABLE.items():
        table[case] = torch.tensor([1, *row])
    return table


def _interp(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Zero crossing along each edge: (v0·w1 − v1·w0) / (w1 − w0); weights (E, 2, 1), values (E, 2, D)."""
    w = torch.cat([weights[:, 1:2], -weights[:, 0:1]], dim=1)
    return (values * w).sum(1) / w.sum(1)


class FlexiCubes:
    """Inference-mode FlexiCubes extractor (official `FlexiCubes.__call__` with training=False)."""

    def __init__(self, weight_scale: float = 0.99) -> None:
        self.weight_scale = weight_scale
        self.dmc_table, self.num_vd_table = _dmc_table()
        self.check_table = _check_table()

    def __call__(
        self,
        voxelgrid_vertices: torch.Tensor,
        scalar_field: torch.Tensor,
        cube_idx: torch.Tensor,
        cube_coords: torch.Tensor,
        resolution: int,
        beta: torch.Tensor,
        alpha: torch.Tensor,
        gamma_f: torch.Tensor,
        voxelgrid_colors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Vertices (V, 3), triangles (F, 3) and sigmoid vertex colours (V, C) or None."""
        dev = voxelgrid_vertices.device
        occ = scalar_field < 0
        occ_fx8 = occ[cube_idx]
        n_occ = occ_fx8.sum(-1)
        surf = (n_occ > 0) & (n_occ < 8)
        if not bool(surf.any()):
            colors = None if voxelgrid_colors is None else voxelgrid_colors.new_zeros(0, voxelgrid_colors.shape[-1])
            return voxelgrid_vertices.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=dev), colors
        s = self.weight_scale
        beta = (torch.tanh(beta) * s + 1)[surf]
        alpha = (torch.tanh(alpha) * s + 1)[surf]
        gamma = (torch.sigmoid(gamma_f) * s + (1 - s) / 2)[surf]
        if voxelgrid_colors is not None:
            voxelgrid_colors = torch.sigmoid(voxelgrid_colors)
        surf_idx = cube_idx[surf]
        case_ids = self._case_ids(occ_fx8[surf], cube_coords[surf], resolution)
        surf_edges, idx_map, edge_counts, edge_mask = self._surface_edges(occ, surf_idx)
        vd, vd_gamma, vd_idx_map, vd_color = self._dual_vertices(
            voxelgrid_vertices, surf_edges, scalar_field, case_ids, beta, alpha, gamma, idx_map, voxelgrid_colors
        )
        faces = self._triangulate(scalar_field, surf_edges, vd_gamma, edge_counts, idx_map, vd_idx_map, edge_mask)
        return vd, faces, vd_color

    def _case_ids(self, occ_fx8: torch.Tensor, coords: torch.Tensor, res: int) -> torch.Tensor:
        """DMC case per surface cube; ambiguous cubes with an ambiguous face neighbour take the inverted case."""
        case_ids = (occ_fx8.long() << torch.arange(8, device=occ_fx8.device)).sum(-1)
        config = self.check_table.to(case_ids.device)[case_ids]
        ambiguous = (config[:, 0] == 1).nonzero().squeeze(1)
        if ambiguous.numel() == 0:
            return case_ids
        coords = coords.long()
        amb_coords, amb_config = coords[ambiguous], config[ambiguous]
        adj = amb_coords + amb_config[:, 1:4]
        inside = ((adj >= 0) & (adj < res)).all(dim=1)

        def key(c: torch.Tensor) -> torch.Tensor:
            return (c[:, 0] * res + c[:, 1]) * res + c[:, 2]

        amb_keys, _ = torch.sort(key(amb_coords))
        q = key(adj)
        pos = torch.searchsorted(amb_keys, q).clamp_(max=amb_keys.shape[0] - 1)
        invert = inside & (amb_keys[pos] == q)
        case_ids[ambiguous[invert]] = amb_config[invert, 4]
        return case_ids

    def _surface_edges(
        self, occ: torch.Tensor, surf_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unique sign-changing edges; per cube edge: its surface-edge index (or -1), share count and surface flag."""
        all_edges = surf_idx[:, CUBE_EDGES.to(surf_idx.device)].reshape(-1, 2)
        # Unique (v0, v1) pairs in lexicographic order, as torch.unique(dim=0), through 1-D keys (far less memory).
        n = int(all_edges.max()) + 1
        keys, inverse, counts = torch.unique(
            all_edges[:, 0] * n + all_edges[:, 1], return_inverse=True, return_counts=True
        )
        unique_edges = torch.stack([keys // n, keys % n], dim=1)
        is_surf = occ[unique_edges].sum(-1) == 1
        mapping = torch.full((unique_edges.shape[0],), -1, dtype=torch.long, device=surf_idx.device)
        mapping[is_surf] = torch.arange(int(is_surf.sum()), device=surf_idx.device)
        return unique_edges[is_surf], mapping[inverse], counts[inverse], is_surf[inverse]

    def _dual_vertices(
        self,
        x: torch.Tensor,
        surf_edges: torch.Tensor,
        sdf: torch.Tensor,
        case_ids: torch.Tensor,
        beta: torch.Tensor,
        alpha: torch.Tensor,
        gamma: torch.Tensor,
        idx_map: torch.Tensor,
        colors: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Dual vertices grouped by vertex count per case (1, 2, ...), each group in cube order."""
        dev = x.device
        dmc = self.dmc_table.to(dev)
        num_vd = self.num_vd_table.to(dev)[case_ids]
        group_edges, group_vd, group_cube, vd_gamma = [], [], [], []
        total = 0
        for num in torch.unique(num_vd).tolist():
            cubes = (num_vd == num).nonzero().squeeze(1)
            edges = dmc[case_ids[cubes], :num].reshape(-1, num * 7)
            vd_ids = (torch.arange(cubes.shape[0] * num, device=dev) + total).repeat_interleave(7).reshape_as(edges)
            owner = cubes.unsqueeze(1).expand_as(edges)
            valid = edges != -1
            group_edges.append(edges[valid])
            group_vd.append(vd_ids[valid])
            group_cube.append(owner[valid])
            vd_gamma.append(gamma[cubes].repeat_interleave(num))
            total += cubes.shape[0] * num
        edge, to_vd, cube = torch.cat(group_edges), torch.cat(group_vd), torch.cat(group_cube)
        flat = cube * 12 + edge
        surf_id = idx_map.reshape(-1)[flat]
        ends = surf_edges[surf_id]
        x_group = x[ends]
        s_group = sdf[ends].unsqueeze(-1)
        alpha_group = alpha[:, CUBE_EDGES.to(dev)].reshape(-1, 2)[flat].unsqueeze(-1)
        beta_group = beta.reshape(-1)[flat].unsqueeze(-1)
        beta_sum = beta_group.new_zeros(total, 1).index_add_(0, to_vd, beta_group)
        ue = _interp(s_group * alpha_group, x_group)
        vd = x.new_zeros(total, 3).index_add_(0, to_vd, ue * beta_group) / beta_sum
        vd_color = None
        if colors is not None:
            uc = _interp(s_group * alpha_group, colors[ends])
            vd_color = colors.new_zeros(total, colors.shape[-1]).index_add_(0, to_vd, uc * beta_group) / beta_sum
        vd_idx_map = torch.zeros(idx_map.numel(), dtype=torch.long, device=dev).scatter(0, flat, to_vd)
        return vd, torch.cat(vd_gamma), vd_idx_map, vd_color

    def _triangulate(
        self,
        sdf: torch.Tensor,
        surf_edges: torch.Tensor,
        vd_gamma: torch.Tensor,
        edge_counts: torch.Tensor,
        idx_map: torch.Tensor,
        vd_idx_map: torch.Tensor,
        edge_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Quads around surface edges shared by 4 cubes, oriented towards positive SDF, split by the gamma products."""
        shared = (edge_counts == 4) & edge_mask
        group = idx_map.reshape(-1)[shared]
        edge_ids, order = torch.sort(group, stable=True)
        quads = vd_idx_map[shared][order].reshape(-1, 4)
        s_edges = sdf[surf_edges[edge_ids.reshape(-1, 4)[:, 0]]]
        flip = s_edges[:, 0] > 0
        quads = torch.cat((quads[flip][:, [0, 1, 3, 2]], quads[~flip][:, [2, 3, 1, 0]]))
        quad_gamma = vd_gamma[quads]
        split_02 = quad_gamma[:, 0] * quad_gamma[:, 2] > quad_gamma[:, 1] * quad_gamma[:, 3]
        faces = torch.where(split_02.unsqueeze(1), quads[:, _QUAD_SPLIT_1], quads[:, _QUAD_SPLIT_2])
        return faces.reshape(-1, 3)
