"""A mesh's parts: its connected components, as labels of its vertices and of its faces.

Two vertices belong to one part when a path of edges joins them; a face belongs to the part of
its vertices (all three share one). Reward-guided optimisation moves parts rigidly by these labels,
and a reward with `part_contact` reads which part each surface sample lies on.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch


def vertex_adjacency(edges: torch.Tensor, vertex_count: int) -> scipy.sparse.csr_matrix:
    """`(V, V)` symmetric 0/1 adjacency of the vertex graph `edges (E, 2)` (each undirected edge once)."""
    i, j = edges[:, 0].cpu().numpy(), edges[:, 1].cpu().numpy()
    adjacency = scipy.sparse.coo_matrix((np.ones(len(i)), (i, j)), shape=(vertex_count, vertex_count))
    return (adjacency + adjacency.T).tocsr()


def vertex_components(edges: torch.Tensor, vertex_count: int) -> torch.Tensor:
    """`(V,)` int64: the connected component (part) of every vertex of the graph `edges (E, 2)`."""
    _, labels = scipy.sparse.csgraph.connected_components(vertex_adjacency(edges, vertex_count), directed=False)
    return torch.from_numpy(labels.astype(np.int64)).to(edges.device)


def face_parts(faces: torch.Tensor, vertex_labels: torch.Tensor) -> torch.Tensor:
    """`faces (F, 3)` and their vertices' parts `(V,)` (`vertex_components`) → `(F,)`: the part of every face."""
    return vertex_labels[faces[:, 0]]
