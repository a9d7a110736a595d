"""Tokens that stand for aligned n x n windows of patches (CTS's 2x2 superpatches, dCTS's 2..16).

Two steps, both batched (the only loops run over window sizes):

* :func:`resolve_windows`: which windows become one token. Per size n, a B x (h // n) x (w // n)
  bool map of wanted windows; sizes are resolved largest first on the aligned quadtree: a window
  is taken when it is wanted and none of its cells is covered by a larger window already. Every
  cell ends in exactly one token (its own, or one window's). Windows that would reach past the
  grid (the last row / column of an odd grid for n = 2) are not on the maps: those cells keep
  their own tokens.
* :func:`embed_windows`: the token set. A window of n x n patches is area-averaged to one patch
  (an n x n mean of the pixels: for CTS, the 32x32 region 2x2-averaged to 16x16) and embedded by
  the ViT's **own** patch embedding (its projection as one matrix product over the gathered
  patches: only the live tokens are embedded); its position embedding is the mean of its cells'.
  Tokens of an image are ordered by their window's top-left cell, row-major.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .cost import patch_embedding_flops
from .flops import token_wise_flops
from .packing import host_ints, true_indices
from .token_set import TokenSet, mean_per_group

if TYPE_CHECKING:
    from ..backbone.vit import ViTBackbone

__all__ = ["SharedWindows", "embed_windows", "pooling_flops", "resolve_windows"]


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
    """FLOPs of area-averaging an image for windows of ``sizes``: one per averaged input pixel
    value (fvcore's convention for adaptive average pooling), per size."""
    h, w = grid
    p, ch = backbone.patch_size, backbone.patch_embed.proj.in_channels
    return sum(ch * (h // n) * n * p * (w // n) * n * p for n in sizes if h // n and w // n)


def embed_windows(
    backbone: "ViTBackbone",
    images: torch.Tensor,
    windows: SharedWindows,
    taken: Sequence[Sequence[int]],
) -> Tuple[TokenSet, List[int]]:
    """The token set of ``windows`` on B x 3 x H x W normalised images (padded to the patch size
    here), with ``taken`` the host copy of ``windows.taken``. Returns it and the embedding's FLOPs
    per image (projection and norm of its tokens, the averaging, the position-embedding resize)."""
    from ..backbone.base import pad_to_multiple

    p = backbone.patch_size
    images = pad_to_multiple(images, p)
    b, ch = images.shape[:2]
    h, w = images.shape[-2] // p, images.shape[-1] // p
    grid, cells = (h, w), h * w
    if tuple(windows.side.shape) != (b, cells):
        raise ValueError(f"windows for a {tuple(windows.side.shape)} grid, images of {b} x {h}x{w} patches")
    counts = windows.counts(taken)
    total = sum(counts)
    leader, top_left = _leaders(windows.side, grid)
    rank = torch.cumsum(leader.view(-1), 0) - 1  # token row of every leader cell, image after image
    group = rank.view(b, cells).gather(1, top_left) - host_ints([sum(counts[:i]) for i in range(b)], images.device).view(-1, 1)

    proj = backbone.patch_embed.proj
    vectors = images.new_empty(total, ch * p * p)
    per_size = [sum(int(row[i]) for row in taken) for i in range(len(windows.sizes))]  # batch totals
    for n, count in zip((1,) + tuple(windows.sizes), [total - sum(per_size)] + per_size):
        if count == 0:
            continue
        hn, wn = h // n, w // n
        pooled = images if n == 1 else F.adaptive_avg_pool2d(images[..., : hn * n * p, : wn * n * p], (hn * p, wn * p))
        patches = pooled.view(b, ch, hn, p, wn, p).permute(0, 2, 4, 1, 3, 5)  # B x hn x wn x ch x p x p (a view)
        flat = true_indices((leader & (windows.side == n)).view(-1), count)  # leader cells of size n, in order
        bi, cell = flat // cells, flat % cells
        rows = rank.index_select(0, flat)
        vectors = vectors.index_copy(0, rows, patches[bi, cell // w // n, cell % w // n].reshape(count, -1))
    x = F.linear(vectors, proj.weight.flatten(1), proj.bias)  # (T, C): the patch embedding's convolution
    x = backbone.patch_embed.norm(x)
    pos = backbone.position_embedding(grid)  # 1 x (P + G) x C
    num_prefix = backbone.num_prefix_tokens
    x = x + mean_per_group(pos[:, num_prefix:].expand(b, -1, -1), group, counts).to(x.dtype)
    prefix = backbone.prefix_tokens(b).to(x.dtype) + pos[:, :num_prefix].to(x.dtype)
    tokens = TokenSet.from_groups(prefix, x, group, counts, grid, validate=False)

    dense = patch_embedding_flops(backbone, grid)  # every cell's token, plus the resize (if any)
    per_token = proj.out_channels * (proj.in_channels // proj.groups) * proj.kernel_size[0] * proj.kernel_size[1]
    per_token += token_wise_flops(backbone.patch_embed.norm)
    flops = []
    for row, n_tokens in zip(taken, counts):
        used = [s for s, t in zip(windows.sizes, row) if int(t)]
        flops.append(dense - per_token * (cells - n_tokens) + pooling_flops(backbone, grid, used))
    return tokens, flops
