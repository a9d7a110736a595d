"""Tokens that stand for aligned n x n windows of patches (CTS's 2x2 superpatches, dCTS's 2..16).

Two steps, both batched (the only loops run over window sizes):

* :func:`resolve_windows`: which windows become one token. Per size n, a B x (h // n) x (w // n)
  bool map of wanted windows; sizes are resolved largest first on the aligned quadtree: a window
  is taken when it is wanted and none of its cells is covered by a larger window already. Every
  cell ends in exactly one token (its own, or one window's). Windows that would reach past the
  grid (the last row / column of an odd grid for n = 2) are not on the maps: those cells keep
  their own tokens.
* :func:`prepare_windows` then :func:`embed_prepared`: the token set. A window of n x n
  patches is area-averaged to one patch (an n x n mean of the pixels: for CTS, the 32x32 region
  2x2-averaged to 16x16) and embedded by
  the ViT's **own** patch embedding (its projection as one matrix product); its position
  embedding is the mean of its cells'. Tokens of an image are ordered by their window's top-left
  cell, row-major. Every patch and every window of every size is embedded before the counts of
  the windows taken are known (:func:`prepare_windows`), so that with a threshold the host waits
  for them with that work queued and then only gathers the tokens (:func:`embed_prepared`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .cost import patch_embedding_flops
from .flops import token_wise_flops
from .packing import host_ints, to_device, true_indices
from .token_set import TokenSet

if TYPE_CHECKING:
    from ..backbone.vit import ViTBackbone

__all__ = ["PreparedWindows", "SharedWindows", "embed_prepared", "embedding_flops", "pooling_flops", "prepare_windows",
           "resolve_windows"]


@dataclass
class SharedWindows:
    """What :func:`resolve_windows` decided for a batch.

    Attributes:
        side: B x G long, the window side of the token that owns each cell (1: its own token).
        taken: B x S long (on the device), windows taken per image and size, in ``sizes`` order.
        sizes: the window sides, ascending.
    """

    side: torch.Tensor
    taken: torch.Tensor
    sizes: Tuple[int, ...]

    def counts(self, taken: Sequence[Sequence[int]]) -> List[int]:
        """Tokens per image, from host counts of windows taken per size (``taken[b][s]``)."""
        cells = self.side.shape[1]
        return [cells - sum((n * n - 1) * int(t) for n, t in zip(self.sizes, row)) for row in taken]


def resolve_windows(wanted: Dict[int, torch.Tensor], grid: Tuple[int, int]) -> SharedWindows:
    """Largest-first resolution of wanted windows (side n -> B x h//n x w//n bool) on an h x w grid."""
    h, w = int(grid[0]), int(grid[1])
    sizes = tuple(sorted(int(n) for n in wanted))
    if not sizes or sizes[0] < 2:
        raise ValueError(f"window sides must be at least 2 patches, got {list(sizes)}")
    first = next(iter(wanted.values()))
    b, dev = first.shape[0], first.device
    side = torch.ones(b, h, w, dtype=torch.long, device=dev)
    covered = torch.zeros(b, h, w, dtype=torch.bool, device=dev)
    taken: Dict[int, torch.Tensor] = {}
    for n in reversed(sizes):
        hn, wn = h // n, w // n
        want = wanted[n]
        if tuple(want.shape) != (b, hn, wn):
            raise ValueError(f"the {n}x{n} windows of a {h}x{w} grid form a {(b, hn, wn)} map, got {tuple(want.shape)}")
        if hn == 0 or wn == 0:
            taken[n] = torch.zeros(b, dtype=torch.long, device=dev)
            continue
        inside = covered[:, : hn * n, : wn * n]
        blocked = inside.reshape(b, hn, n, wn, n).any(dim=4).any(dim=2)  # a cell already in a larger window
        take = want.bool() & ~blocked  # B x hn x wn
        cells = take.repeat_interleave(n, dim=1).repeat_interleave(n, dim=2)  # B x hn*n x wn*n
        cells = F.pad(cells, (0, w - wn * n, 0, h - hn * n))
        covered = covered | cells
        side = torch.where(cells, n, side)
        taken[n] = take.flatten(1).sum(dim=1)
    return SharedWindows(side.view(b, h * w), torch.stack([taken[n] for n in sizes], dim=1), sizes)


def _leaders(side: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B x G bool: the top-left cell of every token's window, B x G long: each cell's top-left cell)."""
    h, w = grid
    b = side.shape[0]
    n = side.view(b, h, w)
    r = torch.arange(h, device=side.device).view(1, h, 1)
    c = torch.arange(w, device=side.device).view(1, 1, w)
    top, left = r - r % n, c - c % n
    leader = (top == r) & (left == c)
    return leader.view(b, h * w), (top * w + left).view(b, h * w)


def pooling_flops(backbone: "ViTBackbone", grid: Tuple[int, int], sizes: Sequence[int]) -> int:
    """FLOPs of area-averaging an image for windows of ``sizes`` as :func:`prepare_windows` does,
    level by level (each side 2n a 2 x 2 average of side n, intermediate sides included): one per
    averaged input value (fvcore's convention for adaptive average pooling)."""
    h, w = grid
    p, ch = backbone.patch_size, backbone.patch_embed.proj.in_channels
    flops, n, largest = 0, 2, max([n for n in sizes if h // n and w // n], default=1)
    while n <= largest:
        flops += ch * (h // n) * 2 * p * (w // n) * 2 * p  # the level-n/2 values inside whole windows of n
        n *= 2
    return flops


@dataclass
class PreparedWindows:
    """What :func:`prepare_windows` computes before the host counts of the windows taken are needed.

    A threshold (dynamic CTS, dCTS) makes the counts depend on the policy's scores: they must come
    to the host before the token set can be built. Everything of fixed shape is queued first, so
    that the GPU works while the host waits and only a gather follows the wait: every patch and
    every window of every size embedded (window sizes the batch does not take included: a few
    percent of the dense patch embedding per size), each with its position embedding.

    Attributes:
        windows: the resolved windows.
        grid: the h x w patch grid.
        leader: B x G bool, the top-left cell of every token's window.
        owner: B x G long, each cell's token among all tokens of the batch (leaders in order).
        source: B x G long, each leader cell's row in ``embedded``.
        embedded: (R, C) the embedded patches, then the windows of each size, image-major.
        prefix: B x P x C prefix tokens with their position embedding.
    """

    windows: SharedWindows
    grid: Tuple[int, int]
    leader: torch.Tensor
    owner: torch.Tensor
    source: torch.Tensor
    embedded: torch.Tensor
    prefix: torch.Tensor


@functools.lru_cache(maxsize=64)
def _grid_indices(grid: Tuple[int, int], n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For aligned n x n windows of an h x w grid: (the cells inside windows, each one's window,
    both row-major; every cell's window, (G,), clamped where a cell lies outside them). They
    depend on nothing else, so recent ones are kept."""
    h, w = grid
    hn, wn = h // n, w // n
    r, c = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)
    every = ((r // n).clamp(max=max(hn - 1, 0)) * wn + (c // n).clamp(max=max(wn - 1, 0))).view(-1)
    inside = ((r < hn * n) & (c < wn * n)).view(-1)
    cells = torch.arange(h * w)[inside]
    return tuple(to_device(t, device) for t in (cells, every[inside], every))


def _window_pos(cell_pos: torch.Tensor, grid: Tuple[int, int], n: int) -> torch.Tensor:
    """(hn * wn, C): the mean position embedding of the cells of every aligned n x n window."""
    cells, window, _ = _grid_indices(tuple(grid), n, cell_pos.device)
    windows = (grid[0] // n) * (grid[1] // n)
    sums = cell_pos.new_zeros(windows, cell_pos.shape[1]).index_add(0, window, cell_pos.index_select(0, cells))
    return sums / float(n * n)


def prepare_windows(backbone: "ViTBackbone", images: torch.Tensor, windows: SharedWindows) -> PreparedWindows:
    """The embedding of every patch and window of ``windows``' sizes, which needs no host counts
    (see :class:`PreparedWindows`)."""
    from ..backbone.base import pad_to_multiple

    p = backbone.patch_size
    images = pad_to_multiple(images, p)
    b, ch = images.shape[:2]
    h, w = images.shape[-2] // p, images.shape[-1] // p
    grid, cells = (h, w), h * w
    if tuple(windows.side.shape) != (b, cells):
        raise ValueError(f"windows for a {tuple(windows.side.shape)} grid, images of {b} x {h}x{w} patches")
    leader, top_left = _leaders(windows.side, grid)
    rank = torch.cumsum(leader.view(-1), 0) - 1  # token row of every leader cell, image after image
    owner = rank.view(b, cells).gather(1, top_left)
    proj = backbone.patch_embed.proj
    pos = backbone.position_embedding(grid)  # 1 x (P + G) x C
    num_prefix = backbone.num_prefix_tokens
    cell_pos = pos[0, num_prefix:]  # (G, C)
    image = torch.arange(b, device=images.device).view(b, 1)
    source = torch.zeros(b, cells, dtype=torch.long, device=images.device)
    vectors, positions, base = [], [], 0
    # window sides are powers of two: the n x n windows resized to one patch are 2 x 2 averages of
    # the n/2 level's (the mean of equal means), so each level reads a quarter of the one before,
    # not the whole image; ``pooled`` holds level ``side``: (h // side) x (w // side) patches
    pooled, side = images, 1
    for n in (1,) + tuple(windows.sizes):
        hn, wn = h // n, w // n
        if hn == 0 or wn == 0:
            continue
        while side < n:
            rows, cols = pooled.shape[-2] // (2 * p), pooled.shape[-1] // (2 * p)  # windows of 2 x 2 of this level
            pooled, side = F.adaptive_avg_pool2d(pooled[..., : rows * 2 * p, : cols * 2 * p], (rows * p, cols * p)), side * 2
        vectors.append(pooled.view(b, ch, hn, p, wn, p).permute(0, 2, 4, 1, 3, 5).reshape(b * hn * wn, ch * p * p))
        positions.append((cell_pos if n == 1 else _window_pos(cell_pos, grid, n)).expand(b, -1, -1).reshape(b * hn * wn, -1))
        window = _grid_indices(tuple(grid), n, images.device)[2].view(1, cells)  # (cells outside windows are not of side n)
        source = torch.where(windows.side == n, window + (base + image * (hn * wn)), source)
        base += b * hn * wn
    # every patch and window of every size through the patch embedding's convolution at once
    x = backbone.patch_embed.norm(F.linear(torch.cat(vectors), proj.weight.flatten(1), proj.bias))  # (R, C)
    embedded = x + torch.cat(positions).to(x.dtype)
    prefix = backbone.prefix_tokens(b).to(embedded.dtype) + pos[:, :num_prefix].to(embedded.dtype)
    return PreparedWindows(windows, grid, leader, owner, source, embedded, prefix)


def embed_prepared(prepared: PreparedWindows, taken: Sequence[Sequence[int]]) -> TokenSet:
    """The token set of prepared windows, ``taken`` the host copy of ``windows.taken``: one gather."""
    counts = prepared.windows.counts(taken)
    b = len(counts)
    rows = true_indices(prepared.leader.view(-1), sum(counts))  # every token's leader cell, in token order
    x = prepared.embedded.index_select(0, prepared.source.view(-1).index_select(0, rows))
    starts = host_ints([sum(counts[:i]) for i in range(b)], x.device).view(-1, 1)
    return TokenSet.from_groups(prepared.prefix, x, prepared.owner - starts, counts, prepared.grid, validate=False)


def embedding_flops(backbone: "ViTBackbone", grid: Tuple[int, int], sizes: Sequence[int]) -> int:
    """FLOPs of :func:`prepare_windows` per image: the projection and norm of every patch and of
    every window of ``sizes``, the averaging for each size, and the position-embedding resize."""
    h, w = grid
    proj = backbone.patch_embed.proj
    per_token = proj.out_channels * (proj.in_channels // proj.groups) * proj.kernel_size[0] * proj.kernel_size[1]
    per_token += token_wise_flops(backbone.patch_embed.norm)
    windows = sum((h // n) * (w // n) for n in sizes)
    return patch_embedding_flops(backbone, grid) + per_token * windows + pooling_flops(backbone, grid, sizes)
