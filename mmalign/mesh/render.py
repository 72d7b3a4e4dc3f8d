"""A small software rasteriser for looking at meshes in reports: flat-shaded, z-buffered, orthographic.

No OpenGL, no matplotlib: every face is scan-converted in numpy. The mesh is normalised to the
unit box and seen from `azimuth` degrees around the vertical (z) axis and `elevation` degrees
above the horizon, lit from the viewer's upper left. A face seen from its front (its winding's
normal towards the viewer) is drawn in grey-blue; a face seen from behind in orange, so holes
(the inside shows through) and inward-flipped patches stand out. The background is white.
"""

from __future__ import annotations

import numpy as np
import torch
import trimesh

from mmalign.mesh.io import normalise_to_unit_box

FRONT = np.array([0.55, 0.65, 0.85])
BACK = np.array([0.95, 0.55, 0.2])
_LIGHT = np.array([-0.4, 0.5, 0.77])  # in view coordinates: x right, y up, z towards the viewer


def view_rotation(azimuth: float, elevation: float) -> np.ndarray:
    """`(3, 3)`: world (z up) → view coordinates (x right, y up, z towards the viewer)."""
    a, e = np.radians(azimuth), np.radians(elevation)
    towards_viewer = np.array([np.cos(e) * np.sin(a), -np.cos(e) * np.cos(a), np.sin(e)])
    right = np.array([np.cos(a), np.sin(a), 0.0])
    up = np.cross(towards_viewer, right)
    return np.stack([right, up, towards_viewer])


def render_mesh(mesh: trimesh.Trimesh, size: int = 128, azimuth: float = 35.0, elevation: float = 25.0) -> np.ndarray:
    """`(size, size, 3)` float image in [0, 1] of `mesh` (see the module doc)."""
    unit = normalise_to_unit_box(mesh)
    view = np.asarray(unit.vertices) @ view_rotation(azimuth, elevation).T  # (V, 3)
    scale = 0.9 * size / max(float(np.ptp(view[:, :2], axis=0).max()), 1e-9)
    centre = (view[:, :2].max(axis=0) + view[:, :2].min(axis=0)) / 2
    xy = (view[:, :2] - centre) * scale * np.array([1.0, -1.0]) + size / 2  # pixel coordinates, y down
    depth = view[:, 2]
    faces = np.asarray(unit.faces)
    normals = np.cross(view[faces[:, 1]] - view[faces[:, 0]], view[faces[:, 2]] - view[faces[:, 0]])
    lengths = np.linalg.norm(normals, axis=1)
    keep = lengths > 0
    faces, normals = faces[keep], normals[keep] / lengths[keep, None]
    facing = normals[:, 2] >= 0
    light = _LIGHT / np.linalg.norm(_LIGHT)
    shade = 0.35 + 0.65 * np.abs(normals @ light)
    colours = np.where(facing[:, None], FRONT, BACK) * shade[:, None]

    image = np.ones((size, size, 3))
    zbuffer = np.full((size, size), -np.inf)
    for face, colour in zip(faces, colours):
        corners = xy[face]
        lo = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, size - 1)
        hi = np.clip(np.ceil(corners.max(axis=0)).astype(int), 0, size - 1)
        px, py = np.meshgrid(np.arange(lo[0], hi[0] + 1) + 0.5, np.arange(lo[1], hi[1] + 1) + 0.5)
        (x0, y0), (x1, y1), (x2, y2) = corners
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if abs(area) < 1e-12:
            continue
        w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / area
        w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / area
        w2 = 1.0 - w0 - w1
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        if not inside.any():
            continue
        z = w0 * depth[face[0]] + w1 * depth[face[1]] + w2 * depth[face[2]]
        rows, cols = py[inside].astype(int), px[inside].astype(int)
        nearer = z[inside] > zbuffer[rows, cols]
        rows, cols = rows[nearer], cols[nearer]
        zbuffer[rows, cols] = z[inside][nearer]
        image[rows, cols] = colour
    return image


def render_views(mesh: trimesh.Trimesh, size: int = 128, azimuths: tuple[float, ...] = (35.0, 215.0)) -> torch.Tensor:
    """`(3, size, size · len(azimuths))` float tensor in [0, 1]: the mesh from each azimuth, side by side."""
    views = [render_mesh(mesh, size, azimuth) for azimuth in azimuths]
    return torch.from_numpy(np.concatenate(views, axis=1)).permute(2, 0, 1).float()
