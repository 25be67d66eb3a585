"""Candidate trees verified in one forward pass: structure, tree-attention mask, position ids.

A tree has N nodes; node 0 is the root (the last decided token), every other node a candidate
token at depth d ≥ 1 named by its path (c₁, …, c_d) of top-k indices: head d's c_d-th most
likely token (Medusa), or c = 0 throughout for a chain (a draft model's or a copied guess).
Nodes are ordered by depth, so a parent precedes its children and the ancestors of a node
occupy the slots before it. In the verifying forward pass node i sits in cache slot
``start + i`` and

    mask[i, j] = j is an ancestor of i or i itself,    position[i] = start + depth(i),

so each candidate attends exactly to the prefix and its own path, as in sequential decoding.

References:
  Cai et al. (2024), "Medusa: Simple LLM Inference Acceleration Framework with Multiple
  Decoding Heads", arXiv:2401.10774 (tree attention; trees from per-head top-k accuracies);
  Miao et al. (2024), "SpecInfer" (token-tree verification).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Tree", "chain_tree", "tree_from_accuracies", "tree_from_paths"]


class Tree(NamedTuple):
    """A static candidate tree (NumPy arrays: constants of the compiled loop).

    Attributes:
      paths: the non-root nodes' paths, in node order (node i + 1 is ``paths[i]``).
      parents: (N,) parent of each node (−1 for the root).
      depths: (N,) depth of each node (0 for the root).
      choices: (N,) the node's top-k index at its depth's head (0 for the root).
      mask: (N, N) bool, mask[i, j] = j is an ancestor of i or i.
      ancestors: (N, D + 1) ancestors[i, d] = the ancestor of i at depth d (i itself for
        d ≥ depth(i)), D the tree's depth.
    """

    paths: tuple[tuple[int, ...], ...]
    parents: np.ndarray
    depths: np.ndarray
    choices: np.ndarray
    mask: np.ndarray
    ancestors: np.ndarray

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return int(self.depths.max())

    @property
    def is_chain(self) -> bool:
        return bool(np.all(self.parents[1:] == np.arange(self.size - 1)))

    @property
    def top_k(self) -> int:
        """The largest top-k index any head must supply, plus one."""
        return int(self.choices.max()) + 1


def tree_from_paths(paths: Sequence[Sequence[int]]) -> Tree:
    """The `Tree` of the given node paths (the root is implicit; every prefix must be a node).

    Raises:
      ValueError: a path with a negative index, a duplicate path, or a missing prefix.
    """
    clean = [tuple(int(c) for c in p) for p in paths]
    if any(len(p) == 0 or min(p) < 0 for p in clean):
        raise ValueError("paths must be non-empty tuples of top-k indices >= 0.")
    if len(set(clean)) != len(clean):
        raise ValueError("paths must not repeat a node.")
    clean.sort(key=lambda p: (len(p), p))
    index = {(): 0}
    for i, p in enumerate(clean):
        if p[:-1] not in index:
            raise ValueError(f"paths: the prefix {p[:-1]} of {p} is not a node of the tree.")
        index[p] = i + 1
    n = len(clean) + 1
    parents = np.full(n, -1, np.int32)
    depths = np.zeros(n, np.int32)
    choices = np.zeros(n, np.int32)
    for p, i in index.items():
        if p:
            parents[i], depths[i], choices[i] = index[p[:-1]], len(p), p[-1]
    depth = int(depths.max())
    mask = np.zeros((n, n), bool)
    ancestors = np.zeros((n, depth + 1), np.int32)
    for p, i in index.items():
        chain = [index[p[:d]] for d in range(len(p) + 1)]
        mask[i, chain] = True
        ancestors[i] = chain + [i] * (depth + 1 - len(chain))
    return Tree(tuple(clean), parents, depths, choices, mask, ancestors)


def chain_tree(length: int) -> Tree:
    """A chain of ``length`` candidates (a draft model's or a copied guess); 0: the root only."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}.")
    return tree_from_paths([(0,) * d for d in range(1, length + 1)])


def tree_from_accuracies(accuracies: np.ndarray, size: int) -> Tree:
    """The tree of ``size`` candidates that maximises the expected accepted length.

    With a_d[c] the measured probability that head d's c-th most likely token is the right one
    (assumed independent across heads, as in Medusa), a node (c₁, …, c_d) is accepted with
    probability ∏_k a_k[c_k], and the expected number of accepted tokens is the sum of that
    over the nodes. Every child is at most as likely as its parent, so taking nodes best first
    (a heap, starting from the depth-1 nodes) gives the optimal prefix-closed tree.

    Args:
      accuracies: (num_heads, top_k) a_d[c] in [0, 1].
      size: number of candidate nodes (the root excluded), ≥ 1.

    Returns:
      The `Tree`.
    """
    acc = np.asarray(accuracies, np.float64)
    if acc.ndim != 2 or acc.size == 0:
        raise ValueError(f"accuracies must have shape (num_heads, top_k), got {acc.shape}.")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}.")
    heads, k = acc.shape
    heap = [(-acc[0, c], (c,)) for c in range(k)]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < size:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < heads:
            d = len(path)
            for c in range(k):
                heapq.heappush(heap, (neg * acc[d, c], path + (c,)))
    return tree_from_paths(chosen)
