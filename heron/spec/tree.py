"""Token trees (SpecInfer): several candidate continuations verified in one forward.

A tree of drafts is two parallel lists: `tokens[j]` is node j's token and `parents[j]` its
parent node (-1: the root, which is the request's last real token). Parents always come
before their children (parents[j] < j), so any prefix of the lists is a tree too and a node's
ancestors occupy lower indices. A linear chain of k drafts is parents = [-1, 0, ..., k - 2].

The runner gives the root and the nodes consecutive KV slots (root at the request's next
position p, node j at slot p + 1 + j) and RoPE positions by depth (node j at p + depth(j)); in
attention a node sees the whole context, the root, and its own ancestors, nothing else (the
tree mask). Every node is sampled with its path as history; the accepted path is followed
from the root as long as the target's token at a node equals one of its children's tokens.
The accepted nodes' KV then moves to the slots their final positions have (p + 1, p + 2, ...),
so the cache afterwards holds exactly what a linear run of the same tokens would.
"""
from __future__ import annotations

import torch


def is_chain(parents: list[int]) -> bool:
    return all(p == j - 1 for j, p in enumerate(parents))


def check_tree(tokens: list[int], parents: list[int]) -> None:
    if len(tokens) != len(parents):
        raise ValueError(f"a draft tree needs one parent per token; got {len(tokens)} tokens, "
                         f"{len(parents)} parents")
    for j, p in enumerate(parents):
        if not -1 <= p < j:
            raise ValueError(f"draft tree node {j} has parent {p}; parents must be -1 (the root) or an "
                             f"earlier node")


def depths(parents: list[int]) -> list[int]:
    """Depth of every node (a child of the root has depth 1)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def path_to(parents: list[int], node: int) -> list[int]:
    """Nodes from the root's child down to `node` (inclusive); [] for the root (-1)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def trim(tokens: list[int], parents: list[int], max_nodes: int, max_depth: int) -> tuple[list[int], list[int]]:
    """The largest prefix-closed part of the tree with at most `max_nodes` nodes, none deeper
    than `max_depth` (nodes are kept in order, so parents stay before children)."""
    keep: list[int] = []
    index: dict[int, int] = {}
    for j, d in enumerate(depths(parents)):
        if len(keep) >= max_nodes:
            break
        p = parents[j]
        if d <= max_depth and (p < 0 or p in index):
            index[j] = len(keep)
            keep.append(j)
    return [tokens[j] for j in keep], [-1 if parents[j] < 0 else index[parents[j]] for j in keep]


def accept(tokens: list[int], parents: list[int], sampled: list[int]) -> list[int]:
    """The accepted path: `sampled[0]` is the target's token at the root, `sampled[1 + j]` at
    node j. Returns the nodes accepted, in order (the step's new tokens are then
    [sampled[0]] + [sampled[1 + j] for j in path])."""
    children: dict[int, dict[int, int]] = {}
    for j, (t, p) in enumerate(zip(tokens, parents)):
        children.setdefault(p, {}).setdefault(t, j)     # a duplicate sibling is never reached
    path: list[int] = []
    node = -1
    while True:
        nxt = children.get(node, {}).get(sampled[1 + node])
        if nxt is None:
            return path
        path.append(nxt)
        node = nxt


def attention_mask(parents: list[int]) -> torch.Tensor:
    """[1 + n, 1 + n] bool: row i (0 = the root, 1 + j = node j) may see column c."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    for j, p in enumerate(parents):
        mask[1 + j] = mask[1 + p]          # a parent's row: its ancestors (the root for p = -1)
        mask[1 + j, 1 + j] = True
    return mask


def build(branches: list[list[int]]) -> tuple[list[int], list[int]]:
    """Merge candidate continuations into a trie (shared prefixes once); the first branch's
    nodes come first, so when it is accepted nothing moves in the cache."""
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[tuple[int, int], int] = {}
    for branch in branches:
        node = -1
        for t in branch:
            nxt = children.get((node, t))
            if nxt is None:
                nxt = children[(node, t)] = len(tokens)
                tokens.append(t)
                parents.append(node)
            node = nxt
    return tokens, parents
