"""The token set: a batch of ViT token sequences whose images keep different numbers of tokens.

It is what every token-reduction method (PAUMER, DoViT, CTS, dCTS, DToP) hands from one block
to the next. Live tokens are packed, image after image, into one ``(T, C)`` buffer
(:class:`~.packing.PackedLayout`), so that blocks pay only for live tokens. Beside it the set
keeps, per image:

* ``owner`` (B x G, G = grid cells): the row of :meth:`TokenSet.patches` whose token stands for
  each cell, or -1. A token that stands for a superpatch (CTS, dCTS) owns all its cells, so
  dense reassembly copies its value to every one of them;
* finalised tokens, which left the sequence with a value that the dense map still needs: their
  features (PAUMER pauses, DoViT stops) or their logits (DToP, PAUMER's early exit), each kind in
  a :class:`FinalStore` with its own cell index;
* the live lengths at every block run (``history``), for per-image FLOPs and token counts.

Every operation is batched: no Python loop over images touches a tensor, and host syncs happen
only where a shape depends on data (one per threshold-based reduction, none for top-k).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .packing import HostCopy, PackedLayout, host_ints

__all__ = ["FINAL_KINDS", "FinalStore", "TokenSet", "mean_per_group"]

#: What a finalised token can leave behind: its features or its logits.
FINAL_KINDS = ("features", "logits")


class FinalStore:
    """Values of finalised tokens of one kind and, per grid cell, the row holding its value.

    Removals append chunks (no copy of what came before); :meth:`values` concatenates them
    once, at reassembly. Immutable: adding returns a new store.
    """

    def __init__(self, chunks: Tuple[torch.Tensor, ...], index: torch.Tensor, rows: int) -> None:
        self.chunks = chunks  # each (R_i, D)
        self.index = index  # (B, G) long: row of values() per cell, -1 where none
        self.rows = rows  # sum of R_i (host)

    @classmethod
    def empty(cls, batch: int, cells: int, device: torch.device) -> "FinalStore":
        return cls((), torch.full((batch, cells), -1, dtype=torch.long, device=device), 0)

    def add(self, values: torch.Tensor, cell_rank: torch.Tensor, newly_final: torch.Tensor) -> "FinalStore":
        """Append ``values`` (R x D); ``cell_rank`` (B x G) is each cell's row in ``values``,
        used where ``newly_final`` (B x G bool) is set."""
        return self.with_rows(values, self.index_adding(cell_rank, newly_final))

    def index_adding(self, cell_rank: torch.Tensor, newly_final: torch.Tensor) -> torch.Tensor:
        """(B, G) the cell index once rows ranked ``cell_rank`` are appended where ``newly_final``:
        it needs only the rows held so far, not the appended ones (so it can be queued before
        their count is known)."""
        return torch.where(newly_final, cell_rank + self.rows, self.index)

    def with_rows(self, values: torch.Tensor, index: torch.Tensor) -> "FinalStore":
        """Append ``values`` (R x D) with the new cell ``index`` of :meth:`index_adding`."""
        if self.chunks and values.shape[1:] != self.chunks[0].shape[1:]:
            raise ValueError(f"finalised values of shape {tuple(values.shape[1:])} do not match earlier ones {tuple(self.chunks[0].shape[1:])}")
        return FinalStore(self.chunks + (values,), index, self.rows + values.shape[0])

    def values(self) -> Optional[torch.Tensor]:
        """(R, D) all finalised values, or None when nothing was finalised."""
        if not self.chunks:
            return None
        return self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks, 0)


def mean_per_group(values: torch.Tensor, group: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Mean of dense per-cell ``values`` (B x G x D) over the cells of each token.

    ``group`` (B x G long) numbers the tokens of each image 0..counts[b]-1 (as for
    :meth:`TokenSet.from_groups`). Returns (sum(counts), D), image after image: e.g. the position
    embedding of a shared superpatch, the mean of its cells' embeddings (CTS, dCTS).
    """
    rows = (group + _group_starts(counts, values.device).view(-1, 1)).view(-1)
    return _cell_mean(values, rows, int(sum(counts)))


def _cell_mean(dense: torch.Tensor, rows: torch.Tensor, total: int, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, G, D) -> (total, D): row r is the mean of the cells with ``rows == r`` (and weight 1)."""
    b, g, d = dense.shape
    weight = dense.new_ones(b * g) if weight is None else weight.to(dense.dtype)
    sums = dense.new_zeros(total, d).index_add(0, rows, dense.reshape(b * g, d) * weight.unsqueeze(1))
    area = dense.new_zeros(total).index_add(0, rows, weight)
    return sums / area.clamp(min=1).unsqueeze(1)


class TokenSet:
    """Live tokens of a batch, packed, with the bookkeeping that puts them back on the grid.

    Build one with :meth:`from_dense` (one token per cell) or :meth:`from_groups` (shared
    superpatches); run blocks on it with :func:`~.blocks.run_blocks`; shrink it with
    :meth:`keep` / :meth:`keep_topk`; read it back with :meth:`to_dense` or :meth:`padded`.
    Operations return new sets; tensors are shared where unchanged and autograd flows through.
    """

    def __init__(
        self,
        x: torch.Tensor,
        layout: PackedLayout,
        grid: Tuple[int, int],
        owner: torch.Tensor,
        finals: Optional[Dict[str, FinalStore]] = None,
        history: Tuple[Tuple[int, ...], ...] = (),
    ) -> None:
        if x.dim() != 2 or x.shape[0] != layout.total:
            raise ValueError(f"packed tokens must be (T={layout.total}, C), got {tuple(x.shape)}")
        self.x = x  # (T, C) packed live tokens
        self.layout = layout
        self.grid = (int(grid[0]), int(grid[1]))
        self.owner = owner  # (B, G) long: row of patches() owning each cell, -1 if not live
        self.finals: Dict[str, FinalStore] = dict(finals or {})
        self.history = history  # live lengths (prefix included) at every block run

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, tokens: torch.Tensor, grid: Tuple[int, int], num_prefix: int = 1) -> "TokenSet":
        """One token per grid cell: ``tokens`` (B, P + G, C), prefix first, cells row-major."""
        b, n, c = tokens.shape
        cells = int(grid[0]) * int(grid[1])
        if n != num_prefix + cells:
            raise ValueError(f"tokens hold {n} per image, expected {num_prefix} prefix + {grid[0]}x{grid[1]} = {num_prefix + cells}")
        layout = PackedLayout([n] * b, num_prefix, tokens.device)
        owner = torch.arange(b * cells, device=tokens.device).view(b, cells)
        return cls(tokens.reshape(b * n, c), layout, grid, owner)

    @classmethod
    def from_groups(
        cls,
        prefix: torch.Tensor,
        patches: torch.Tensor,
        group: torch.Tensor,
        counts: Sequence[int],
        grid: Tuple[int, int],
        validate: bool = True,
    ) -> "TokenSet":
        """Tokens that may stand for several cells (CTS / dCTS superpatches).

        ``prefix`` (B, P, C); ``patches`` (sum(counts), C), image after image; ``group`` (B, G)
        the token (0..counts[b]-1 within image b) that stands for each cell. ``validate`` checks,
        at the cost of host syncs, that every cell names a token of its image and every token
        owns a cell.
        """
        b, p, c = prefix.shape
        counts = [int(n) for n in counts]
        cells = int(grid[0]) * int(grid[1])
        if len(counts) != b or group.shape != (b, cells):
            raise ValueError(f"group must be (B={b}, G={cells}) and counts have {b} entries; got {tuple(group.shape)} and {len(counts)}")
        if patches.shape != (sum(counts), c):
            raise ValueError(f"patches must be (sum(counts)={sum(counts)}, C={c}), got {tuple(patches.shape)}")
        layout = PackedLayout([p + n for n in counts], p, prefix.device)
        owner = group.long() + _group_starts(counts, prefix.device).view(-1, 1)
        if validate:
            _check_groups(group, counts, layout)
        x = patches.new_empty(layout.total, c)
        x = x.index_copy(0, layout.patch_rows(), patches).index_copy(0, layout.prefix_rows(), prefix.reshape(b * p, c))
        return cls(x, layout, grid, owner)

    def _replace(self, **changes) -> "TokenSet":
        fields = dict(x=self.x, layout=self.layout, grid=self.grid, owner=self.owner, finals=self.finals, history=self.history)
        fields.update(changes)
        return TokenSet(**fields)

    # ------------------------------------------------------------------ facts
    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    @property
    def num_prefix(self) -> int:
        return self.layout.num_prefix

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def live_counts(self) -> Tuple[int, ...]:
        """Live patch tokens per image (host ints)."""
        return self.layout.patch_counts

    def counts_per_block(self) -> List[List[int]]:
        """Per image, its live patch tokens at each block run so far (for cost records)."""
        p = self.num_prefix
        return [[lengths[b] - p for lengths in self.history] for b in range(self.batch_size)]

    def token_area(self) -> torch.Tensor:
        """(Tp,) grid cells each live patch token stands for (1, or n*n for a superpatch)."""
        owned = (self.owner >= 0).view(-1).long()
        rows = self.owner.clamp(min=0).view(-1)
        return torch.zeros(self.layout.num_patches, dtype=torch.long, device=self.x.device).index_add(0, rows, owned)

    def live_cells(self) -> torch.Tensor:
        """(B, G) bool: cells whose token is still live."""
        return self.owner >= 0

    def final_cells(self, kind: str) -> torch.Tensor:
        """(B, G) bool: cells whose token was finalised with a value of ``kind``."""
        _check_kind(kind)
        store = self.finals.get(kind)
        if store is None:
            return torch.zeros_like(self.owner, dtype=torch.bool)
        return store.index >= 0

    # ------------------------------------------------------------------ views of the live tokens
    def patches(self) -> torch.Tensor:
        """(Tp, C) live patch tokens, image after image (rows that ``owner`` and masks index)."""
        if self.num_prefix == 0:
            return self.x
        return self.x.index_select(0, self.layout.patch_rows())

    def prefix(self) -> torch.Tensor:
        """(B, P, C) prefix tokens."""
        return self.x.index_select(0, self.layout.prefix_rows()).view(self.batch_size, self.num_prefix, -1)

    def with_features(self, x: torch.Tensor, history: Optional[Tuple[Tuple[int, ...], ...]] = None) -> "TokenSet":
        """The same set with new packed features (T, C), e.g. after blocks."""
        return self._replace(x=x, history=self.history if history is None else history)

    def with_patches(self, patches: torch.Tensor) -> "TokenSet":
        """The same set with new live patch features (Tp, C)."""
        if self.num_prefix == 0:
            return self._replace(x=patches)
        return self._replace(x=self.x.index_copy(0, self.layout.patch_rows(), patches))

    def with_prefix(self, prefix: torch.Tensor) -> "TokenSet":
        """The same set with new prefix tokens (B, P, C)."""
        b, p = self.batch_size, self.num_prefix
        return self._replace(x=self.x.index_copy(0, self.layout.prefix_rows(), prefix.reshape(b * p, -1)))

    def padded(self, values: Optional[torch.Tensor] = None, with_prefix: bool = False, fill: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """A padded view for token-wise heads: ((B, L_max, D), key-padding mask (B, L_max) bool,
        True at real tokens). ``values`` are rows of :meth:`patches` (default: the features) or,
        ``with_prefix``, packed rows of ``x``."""
        if values is None:
            values = self.x if with_prefix else self.patches()
        rows = self.layout.pad_rows(with_prefix)
        width = self.layout.pad_width(with_prefix)
        b = self.batch_size
        out = values.new_full((b * width,) + tuple(values.shape[1:]), fill).index_copy(0, rows, values)
        return out.view((b, width) + tuple(values.shape[1:])), self.layout.key_padding_mask(with_prefix)

    def unpad(self, padded: torch.Tensor, with_prefix: bool = False) -> torch.Tensor:
        """Inverse of :meth:`padded`: (B, L_max, D) -> live rows (Tp, D) (or packed (T, D))."""
        return padded.reshape((-1,) + tuple(padded.shape[2:])).index_select(0, self.layout.pad_rows(with_prefix))

    def pool_cells(self, dense: torch.Tensor) -> torch.Tensor:
        """Dense per-cell values (B, G, D) -> (Tp, D), each live token the mean over the cells it
        stands for (e.g. a per-cell target or embedding for the live tokens)."""
        if self.layout.num_patches == 0:
            return dense.new_zeros((0,) + tuple(dense.shape[2:]))
        owned = (self.owner >= 0).view(-1)
        return _cell_mean(dense, self.owner.clamp(min=0).view(-1), self.layout.num_patches, owned)

    # ------------------------------------------------------------------ per-image reductions
    def segment_mean(self, values: torch.Tensor, select: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per image, the mean of the selected live rows: ``values`` (Tp, D), ``select`` (Tp,)
        bool (default all). Returns ((B, D) means, 0 where nothing is selected; (B,) counts)."""
        index = self.layout.patch_batch_index()
        weight = values.new_ones(values.shape[0]) if select is None else select.to(values.dtype)
        sums = values.new_zeros(self.batch_size, values.shape[1]).index_add(0, index, values * weight.unsqueeze(1))
        counts = values.new_zeros(self.batch_size).index_add(0, index, weight)
        return sums / counts.clamp(min=1).unsqueeze(1), counts

    def merge_into_prefix(self, select: torch.Tensor, weight: float = 0.5, index: int = 0) -> "TokenSet":
        """Prefix token ``index`` becomes ``(1 - weight) * itself + weight * mean(selected)`` in
        every image with a selected token (DoViT's Eq. 8 with weight 1/2); others unchanged."""
        if not 0 <= index < self.num_prefix:
            raise ValueError(f"prefix index {index} out of range for {self.num_prefix} prefix tokens")
        mean, counts = self.segment_mean(self.patches(), select)
        prefix = self.prefix()
        old = prefix[:, index]
        new = torch.where((counts > 0).unsqueeze(1), (1 - weight) * old + weight * mean.to(old.dtype), old)
        prefix = torch.cat([prefix[:, :index], new.unsqueeze(1), prefix[:, index + 1:]], 1)
        return self.with_prefix(prefix)

    # ------------------------------------------------------------------ removal
    def count_per_image(self, select: torch.Tensor) -> torch.Tensor:
        """(B,) long: how many live patch tokens of each image ``select`` (Tp,) bool picks (on the device)."""
        select = self._check_rows(select, "select").bool()
        counts = torch.zeros(self.batch_size, dtype=torch.long, device=select.device)
        return counts.index_add(0, self.layout.patch_batch_index(), select.long())

    def keep(
        self, mask: torch.Tensor, save_features: bool = False, save_logits: Optional[torch.Tensor] = None,
        kept: Optional[Sequence[int]] = None,
    ) -> "TokenSet":
        """Keep the live patch tokens where ``mask`` (Tp,) bool is True; the prefix always stays.

        Removed tokens are finalised with their current features (``save_features``) and/or
        with ``save_logits`` (Tp, K) rows; without either they simply leave (their cells then
        read the ``fill`` of :meth:`to_dense`). The new lengths come to the host in one wait,
        after every kernel of the removal is queued (:class:`~.packing.HostCopy`), unless the
        caller knows them already: ``kept``, the tokens ``mask`` keeps in each image (host ints).
        The counts of a data-dependent removal are then ``live_counts`` of the result.
        """
        mask = self._check_rows(mask, "mask").bool()
        if kept is None:
            return self._keep(mask, HostCopy(self.count_per_image(mask)), save_features, save_logits)
        if len(kept) != self.batch_size:
            raise ValueError(f"kept must give one count per image ({self.batch_size}), got {list(kept)}")
        return self._keep(mask, [int(n) for n in kept], save_features, save_logits)

    def keep_topk(
        self,
        scores: torch.Tensor,
        k: Union[int, Sequence[int]],
        largest: bool = True,
        save_features: bool = False,
        save_logits: Optional[torch.Tensor] = None,
    ) -> "TokenSet":
        """Keep the ``k[b]`` live patch tokens of highest (``largest``) or lowest ``scores`` (Tp,)
        in every image b, e.g. PAUMER's ``N - int(tau * N)`` highest-entropy tokens. The counts are
        known on the host, so this needs no host sync. Other arguments as :meth:`keep`."""
        counts = self.live_counts
        ks = [int(k)] * self.batch_size if isinstance(k, int) else [int(v) for v in k]
        if len(ks) != self.batch_size or any(not 0 <= v <= n for v, n in zip(ks, counts)):
            raise ValueError(f"keep_topk needs one k per image with 0 <= k <= live tokens {list(counts)}; got {ks}")
        scores = self._check_rows(scores, "scores")
        width, k_max = max(counts), max(ks)
        if k_max == 0:
            return self._keep(torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device), ks, save_features, save_logits)
        rows = self.layout.pad_rows(False)
        fill = float("-inf") if largest else float("inf")
        padded = scores.new_full((self.batch_size * width,), fill).index_copy(0, rows, scores).view(self.batch_size, width)
        top = padded.topk(k_max, dim=1, largest=largest, sorted=True).indices  # (B, k_max), best first
        valid = torch.arange(k_max, device=scores.device).view(1, -1) < host_ints(ks, scores.device).view(-1, 1)
        chosen = torch.zeros(self.batch_size, width, dtype=torch.bool, device=scores.device).scatter(1, top, valid)
        return self._keep(chosen.view(-1).index_select(0, rows), ks, save_features, save_logits)

    def _keep(
        self, mask: torch.Tensor, kept: Union[Sequence[int], HostCopy], save_features: bool, save_logits: Optional[torch.Tensor],
    ) -> "TokenSet":
        """Removal: (Tp,) bool mask -> the new set. ``kept`` per image, as host ints or still on
        their way (:class:`HostCopy`): every kernel below is queued before they are read.

        The packed rows are permuted once so that the staying rows come first and the removed
        ones after them, each in their order: both are then slices, whatever the counts.
        """
        old = self.layout
        if old.num_patches == 0:
            return self  # every patch token has left already: nothing to remove
        p, dev = self.num_prefix, mask.device
        stays = torch.ones(old.total, dtype=torch.bool, device=dev).index_copy(0, old.patch_rows(), mask)
        order = _stable_partition(stays)  # (T,) staying packed rows, then removed ones
        x = self.x.index_select(0, order)
        # owner: old patch row -> new patch row (-1 when removed)
        kept_before = torch.cumsum(mask, 0)  # (Tp,) kept rows up to and including each row
        new_row = torch.where(mask, kept_before - 1, -1)
        owned = self.owner >= 0
        cells = self.owner.clamp(min=0).view(-1)  # (B * G,) old patch row of every cell
        owner = torch.where(owned, new_row.index_select(0, cells).view_as(owned), -1)
        keeps_logits = save_logits is not None
        if save_features or keeps_logits:
            removed = ~mask
            removed_before = torch.arange(mask.numel(), device=dev) - kept_before  # (Tp,) removed rows before each row
            cell_rank = torch.where(removed, removed_before, -1).index_select(0, cells).view_as(owned)
            newly_final = owned & (owner < 0)
            if keeps_logits:
                logits = self._check_rows(save_logits, "save_logits").index_select(0, _stable_partition(mask, kept_before))
        # the host counts are needed from here on
        kept = kept.wait() if isinstance(kept, HostCopy) else kept
        new = PackedLayout([p + int(n) for n in kept], p, dev)
        finals = dict(self.finals)
        if new.num_patches < old.num_patches:
            if save_features:
                finals["features"] = self._store("features").add(x[new.total:], cell_rank, newly_final)
            if keeps_logits:
                finals["logits"] = self._store("logits").add(logits[new.num_patches:], cell_rank, newly_final)
        return self._replace(x=x[: new.total], layout=new, owner=owner, finals=finals)

    def _store(self, kind: str) -> FinalStore:
        return self.finals.get(kind) or FinalStore.empty(self.batch_size, self.num_cells, self.x.device)

    # ------------------------------------------------------------------ back to the grid
    def to_dense(self, values: Optional[torch.Tensor] = None, final: Optional[str] = "features", fill: float = 0.0) -> torch.Tensor:
        """(B, G, D): every cell takes the value of the token that stands for it.

        Live cells read ``values`` (Tp, D) rows (default: the live features), so a shared token's
        value is copied to every cell it covers; finalised cells read the ``final`` store
        ("features" or "logits"; None: ignore finalised values); cells with neither read
        ``fill``. Reshape to (B, D, H, W) with ``.transpose(1, 2).reshape(B, D, *grid)``.
        """
        if values is None:
            values = self.patches()
        values = self._check_rows(values, "values")
        if values.dim() != 2:
            raise ValueError(f"values must be (Tp, D), got {tuple(values.shape)}")
        tp, d = values.shape
        sources = [values]
        index = self.owner
        if final is not None:
            _check_kind(final)
            store = self.finals.get(final)
            stored = None if store is None else store.values()
            if stored is not None:
                if stored.shape[1:] != values.shape[1:]:
                    raise ValueError(f"finalised {final} have {stored.shape[1]} channels, live values {d}")
                sources.append(stored.to(values.dtype))
                index = torch.where(index >= 0, index, torch.where(store.index >= 0, store.index + tp, -1))
        rows = sum(s.shape[0] for s in sources)
        sources.append(values.new_full((1, d), fill))
        index = torch.where(index >= 0, index, rows)
        return torch.cat(sources, 0).index_select(0, index.view(-1)).view(self.batch_size, self.num_cells, d)

    def overlay_final(self, dense: torch.Tensor, kind: str = "logits") -> torch.Tensor:
        """``dense`` (B, G, D), e.g. a dense head's logits, with every finalised cell replaced by
        its stored ``kind`` value (DToP's final map: pruned tokens keep their early prediction)."""
        _check_kind(kind)
        store = self.finals.get(kind)
        stored = None if store is None else store.values()
        if stored is None:
            return dense
        if dense.shape[:2] != self.owner.shape or stored.shape[1:] != dense.shape[2:]:
            raise ValueError(f"dense must be (B, G) = {tuple(self.owner.shape)} x {tuple(stored.shape[1:])}, got {tuple(dense.shape)}")
        rows = store.index.clamp(min=0).view(-1)
        final = stored.to(dense.dtype).index_select(0, rows).view_as(dense)
        return torch.where((store.index >= 0).unsqueeze(-1), final, dense)

    # ------------------------------------------------------------------ checks
    def _check_rows(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if t.shape[0] != self.layout.num_patches:
            raise ValueError(f"{name} must have one row per live patch token ({self.layout.num_patches}), got shape {tuple(t.shape)}")
        return t


def _stable_partition(select: torch.Tensor, before: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n,) bool -> (n,) long permutation: the positions where ``select`` is True, then the
    others, each in increasing order. A cumulative sum (``before``, when the caller has it) and a
    scatter, so its size is known without asking the GPU how many are True."""
    n = select.numel()
    position = torch.arange(n, device=select.device)
    if before is None:
        before = torch.cumsum(select, 0)  # True entries up to and including each position
    total = before[-1:]  # (1,) on the device
    dest = torch.where(select, before - 1, total + position - before)
    return torch.empty_like(position).index_copy(0, dest, position)


def _check_kind(kind: str) -> None:
    if kind not in FINAL_KINDS:
        raise ValueError(f"unknown finalised kind '{kind}'; known: {list(FINAL_KINDS)}")


def _check_groups(group: torch.Tensor, counts: Sequence[int], layout: PackedLayout) -> None:
    """Every cell names a token of its image and every token owns a cell (host syncs: use once)."""
    outside = (group < 0) | (group >= host_ints(counts, group.device).view(-1, 1))  # (B, G)
    bad = outside.any(dim=1).nonzero().view(-1).tolist()
    if bad:
        raise ValueError(f"group names tokens outside 0..counts[b]-1 in images {bad} (counts {list(counts)})")
    rows = (group + _group_starts(counts, group.device).view(-1, 1)).view(-1)
    area = torch.zeros(layout.num_patches, dtype=torch.long, device=group.device).index_add(0, rows, torch.ones_like(rows))
    empty = sorted(set(layout.patch_batch_index()[area == 0].tolist()))
    if empty:
        raise ValueError(f"images {empty} hold tokens that own no grid cell: every token must stand for at least one cell")


def _group_starts(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """(B,) first token row of each image when images hold ``counts`` tokens, one after another."""
    starts, acc = [], 0
    for n in counts:
        starts.append(acc)
        acc += int(n)
    return host_ints(starts, device)
