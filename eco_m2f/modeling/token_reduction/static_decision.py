"""Decisions captured in the CUDA graph of the blocks before them.

A removal whose counts depend on the data (DoViT: a token stops where its auxiliary head is sure)
must bring the per-image counts to the host before the next run of blocks can pick its graph.
Run eagerly, every kernel of the decision before that wait (the head, the mask, the partition of
the rows, the new owners, the stopped-token sum, the class-token merge: some 85 launches from
Python) comes after the blocks' graph, and the GPU, done with the blocks, waits for the CPU to
issue them. Captured with the blocks, they replay in the same launch, on the graph's bucketed
rows: each row's image is found from the offsets in the graph's device buffer, and the padding
rows (image index B) neither stay nor leave. Only the counts then come to the host; a removal
whose counts the host knows (PAUMER's top-k) waits for nothing.

:class:`StaticDecision` is what a reducer hands the encoder loop for one decision
(``TokenReducer.static_decision``): the device tensors the graph reads (copied into its buffers
before each replay), the function captured after the blocks, and the host step that builds the
new token set from what it left. :func:`static_keep` and :func:`finish_keep` are the removal
itself, the counterpart of :meth:`TokenSet.keep` on bucketed rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Mapping, Optional, Sequence, Tuple, Union

import torch

from .packing import HostCopy, PackedLayout, StaticLayout
from .token_set import FinalStore, TokenSet, _stable_partition

__all__ = ["StaticDecision", "finish_keep", "patch_row_images", "row_images", "row_slots", "static_keep"]

Layout = Union[PackedLayout, StaticLayout]


@dataclass
class StaticDecision:
    """One decision, for capture after a run of blocks.

    Attributes:
        key: what the captured function depends on besides the input shapes (e.g. the layer
            and the threshold); graphs are kept per key.
        inputs: name -> device tensor the function reads, copied into the graph's buffer of the
            same shape before every replay (e.g. the cells' owners).
        compute: ``(rows (R, C), layout, inputs) -> name -> tensor``: run inside the graph on the
            blocks' output rows (bucketed: rows past the last image are padding).
        finish: ``(tokens after the blocks, outputs) -> the token set that goes on``, on the host
            after the replay. The outputs are the graph's buffers: what outlives the pass must
            be copied.
    """

    key: Hashable
    inputs: Dict[str, torch.Tensor]
    compute: Callable[[torch.Tensor, Layout, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]
    finish: Callable[[TokenSet, Dict[str, torch.Tensor]], TokenSet]


def row_images(rows: int, layout: Layout, batch: int) -> torch.Tensor:
    """(rows,) long: the image of every packed row, ``batch`` for rows past the last image
    (the padding of a bucketed graph); from the offsets on the device, without a host sync."""
    offsets = layout.offsets(torch.int32)[: batch + 1].long()  # (B + 1,)
    index = torch.arange(rows, device=offsets.device)
    return torch.searchsorted(offsets[1:].contiguous(), index, right=True)


def row_slots(image: torch.Tensor, offsets: torch.Tensor, width: int) -> torch.Tensor:
    """(R,) long: each packed row's slot in a (B + 1) x ``width`` grid, image-major (the padding
    image last), from its image (:func:`row_images`) and the images' first rows ``offsets``
    ((B + 1,) at least): a padded per-image view of bucketed rows, every size fixed by the input.
    ``width`` must bound every image's length, the padding's included."""
    position = torch.arange(image.numel(), device=image.device) - offsets.long().index_select(0, image)
    return image * width + position


def patch_row_images(rows: int, layout: Layout, batch: int, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """((rows,) long image of every row as :func:`row_images`, (rows,) bool: the row is a patch
    token of a real image, not a prefix token nor padding)."""
    image = row_images(rows, layout, batch)
    offsets = layout.offsets(torch.int32)[: batch + 1].long()
    position = torch.arange(rows, device=offsets.device) - offsets.index_select(0, image)
    return image, (image < batch) & (position >= num_prefix)


def static_keep(
    rows: torch.Tensor, layout: Layout, owner: torch.Tensor, num_prefix: int, leave: torch.Tensor,
    permute: Optional[Mapping[str, torch.Tensor]] = None, image: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """The removal of :meth:`TokenSet.keep` on bucketed rows, every size fixed by the input.

    ``rows`` (R, C) packed tokens (images by ``layout``, padding past them), ``owner`` (B, G)
    each cell's patch row as in :class:`TokenSet`, ``leave`` (R,) bool the patch rows that leave
    (False on prefix and padding rows); ``permute``: name -> (R, D) per-row values that move with
    the rows (e.g. the logits a leaving token is finalised with); ``image`` (R,) each row's image
    as :func:`row_images` gives it, when the caller has it already. Returns:

    * ``x`` (R, C): the staying rows in order, then the leaving ones in order, then the padding;
      every tensor of ``permute`` in the same order, under its name;
    * ``kept`` (B,) long: rows each image keeps, prefix included (the new lengths);
    * ``owner`` (B, G): each cell's new patch row, -1 where it left or was not live;
    * ``cell_rank`` (B, G): a leaving cell's row among the leaving rows; ``newly_final`` (B, G).
    """
    b, p = owner.shape[0], int(num_prefix)
    n = rows.shape[0]
    image = row_images(n, layout, b) if image is None else image  # (R,)
    real = image < b
    stays = real & ~leave
    stay_before = torch.cumsum(stays, 0)  # (R,) staying rows up to and including each
    order = _stable_partition(stays, stay_before)
    kept = torch.zeros(b + 1, dtype=torch.long, device=rows.device).index_add(0, image, stays.long())[:b]
    # a patch row's new patch index: its new packed row less the prefixes of images 0..b
    new_patch = torch.where(stays, stay_before - 1 - (image + 1) * p, -1)
    owned = owner >= 0
    cell_row = owner.clamp(min=0) + (torch.arange(b, device=owner.device).view(-1, 1) + 1) * p  # (B, G) packed row
    new_owner = torch.where(owned, new_patch.index_select(0, cell_row.view(-1)).view_as(owner), -1)
    leave_rank = torch.cumsum(leave, 0) - 1  # (R,) a leaving row's rank among the leaving rows
    newly_final = owned & leave.index_select(0, cell_row.view(-1)).view_as(owner)
    cell_rank = torch.where(newly_final, leave_rank.index_select(0, cell_row.view(-1)).view_as(owner), -1)
    out = {name: values.index_select(0, order) for name, values in (permute or {}).items()}
    out.update(x=rows.index_select(0, order), kept=kept, owner=new_owner, cell_rank=cell_rank, newly_final=newly_final)
    return out


def finish_keep(tokens: TokenSet, outputs: Dict[str, torch.Tensor], save_features: bool,
                kept: Optional[Union[HostCopy, Sequence[int]]] = None, save_logits: bool = False) -> TokenSet:
    """The token set after :func:`static_keep`'s removal (host side): one wait for the counts
    (none when ``kept``, the rows each image keeps with its prefix, is known on the host already),
    then slices. What outlives the graph's next replay is copied, and every copy is queued before
    the wait, so that after it the host only slices and the next graph follows at once: the rows
    (staying ones, then the leaving ones whose features are kept with ``save_features``), the
    owners, and the ``outputs["logits"]`` rows (``save_logits``: permuted with the rows by
    ``static_keep``)."""
    if kept is None:
        kept = HostCopy(outputs["kept"])  # queued first: it lands while the copies below run
    x = outputs["x"].clone()  # (R, C): staying rows, leaving rows, padding
    owner = outputs["owner"].clone()
    logits = outputs["logits"].clone() if save_logits else None
    stores = {}  # kind -> (store, its cell index with the leaving cells added)
    for kind, wanted in (("features", save_features), ("logits", save_logits)):
        if wanted:
            store = tokens.finals.get(kind) or FinalStore.empty(tokens.batch_size, tokens.num_cells, x.device)
            stores[kind] = (store, store.index_adding(outputs["cell_rank"], outputs["newly_final"]))
    counts = kept.wait() if isinstance(kept, HostCopy) else list(kept)
    old, p = tokens.layout, tokens.num_prefix
    new = PackedLayout([int(n) for n in counts], p, old.device)
    finals = dict(tokens.finals)
    if new.num_patches < old.num_patches:
        for kind, (store, index) in stores.items():
            rows = x if kind == "features" else logits
            finals[kind] = store.with_rows(rows[new.total: old.total], index)
    return TokenSet(x[: new.total], new, tokens.grid, owner, finals, tokens.history)
