"""Where each image's live tokens sit in one packed ``(T, C)`` buffer.

Image ``b`` owns rows ``start_b : start_b + length_b``: its prefix (cls) tokens first, then its
live patch tokens; images follow each other in batch order with no padding between them. The
lengths are host integers: a reduction decides them once (one host sync at most), and every
block after it reuses the device index tensors built here from them, so no block ever waits
for the GPU to learn a shape.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Sequence, Tuple

import torch

from ...utils.device import to_device

__all__ = ["HostCopy", "PackedLayout", "StaticLayout", "host_ints", "pack_slots", "to_device", "true_indices", "unpack_slots"]


def host_ints(values: Sequence[int], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A device tensor of host integers (see :func:`to_device`)."""
    return to_device(torch.tensor(list(values), dtype=dtype), device)


class HostCopy:
    """A small device tensor on its way to the host, e.g. the per-image counts of a threshold
    decision.

    ``tensor.tolist()`` would stop the CPU until the GPU has run everything queued before it,
    and the GPU would then idle while the CPU launches the work that follows. Here the copy is
    queued (pinned memory, ``non_blocking``) with an event behind it; the caller queues the work
    that needs no host values first and calls :meth:`wait` only then, so the GPU still has that
    work to run while the CPU builds what depends on the values.
    """

    def __init__(self, t: torch.Tensor) -> None:
        self._event = None
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = t
        self._values = None

    def wait(self) -> list:
        """The values as (nested) Python numbers, once the copy has landed."""
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = self._host.tolist()
        return self._values


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the True entries of a 1-D bool ``mask``, in increasing order.

    ``mask.nonzero()`` would make the CPU wait for the GPU to learn the result's size; the
    caller here already knows ``count`` (the number of True entries), so positions are scattered
    to their ranks instead and False entries go to one spare slot that is cut off.
    """
    n = mask.numel()
    rank = torch.cumsum(mask, 0) - 1  # (n,) rank of each True entry
    dest = torch.where(mask, rank, torch.full_like(rank, count))
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    out.scatter_(0, dest, torch.arange(n, device=mask.device))
    return out[:count]


class PackedLayout:
    """Host lengths of a packed batch and the device index tensors derived from them (built on
    first use, then cached: a layout lives from one reduction to the next)."""

    def __init__(self, lengths: Sequence[int], num_prefix: int, device: torch.device) -> None:
        self.lengths: Tuple[int, ...] = tuple(int(n) for n in lengths)
        self.num_prefix = int(num_prefix)
        self.device = torch.device(device)
        if not self.lengths:
            raise ValueError("a packed layout needs at least one image")
        if min(self.lengths) < self.num_prefix:
            raise ValueError(f"every image holds its {self.num_prefix} prefix tokens; got lengths {self.lengths}")
        self.total = sum(self.lengths)
        self.max_len = max(self.lengths)
        self.min_len = min(self.lengths)
        starts, acc = [], 0
        for n in self.lengths:
            starts.append(acc)
            acc += n
        self.starts: Tuple[int, ...] = tuple(starts)
        self._cache: Dict[Hashable, Any] = {}

    # ------------------------------------------------------------------ host facts
    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def patch_counts(self) -> Tuple[int, ...]:
        """Live patch tokens per image (the lengths without the prefix)."""
        return tuple(n - self.num_prefix for n in self.lengths)

    @property
    def num_patches(self) -> int:
        return self.total - self.batch_size * self.num_prefix

    @property
    def uniform(self) -> bool:
        """True when every image holds the same number of tokens (the packed buffer is then a
        plain ``B x L x C`` tensor, and attention needs neither padding nor a mask)."""
        return self.min_len == self.max_len

    def cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per layout (e.g. an attention backend's block mask)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # ------------------------------------------------------------------ device indices
    def offsets(self, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """(B + 1,) row offsets of the images (cumulative lengths); int32 for flash kernels."""
        return self.cached(("offsets", dtype), lambda: host_ints((0,) + tuple(s + n for s, n in zip(self.starts, self.lengths)), self.device, dtype))

    def batch_index(self) -> torch.Tensor:
        """(T,) the image of every packed row."""
        return self.cached("batch_index", lambda: self._repeat_images(self.lengths))

    def patch_batch_index(self) -> torch.Tensor:
        """(Tp,) the image of every live patch token (rows of ``TokenSet.patches()``)."""
        return self.cached("patch_batch_index", lambda: self._repeat_images(self.patch_counts))

    def prefix_rows(self) -> torch.Tensor:
        """(B * P,) packed rows of the prefix tokens, image-major."""
        def build():
            rows = torch.tensor(self.starts).view(-1, 1) + torch.arange(self.num_prefix).view(1, -1)  # (B, P)
            return self._to_device(rows.view(-1))
        return self.cached("prefix_rows", build)

    def patch_rows(self) -> torch.Tensor:
        """(Tp,) packed rows of the live patch tokens, in order."""
        def build():
            # the k-th patch token of image b sits after the prefixes of images 0..b
            shift = self._host([(b + 1) * self.num_prefix for b in range(self.batch_size)])
            shift = self._repeat(shift, self.patch_counts)
            return torch.arange(self.num_patches, device=self.device) + shift
        return self.cached("patch_rows", build)

    def pad_rows(self, with_prefix: bool) -> torch.Tensor:
        """Row of every packed token (``with_prefix``) or every live patch token in the padded
        ``(B * L_max)`` layout of :meth:`key_padding_mask`: image b, position j -> b * L_max + j."""
        def build():
            counts = self.lengths if with_prefix else self.patch_counts
            width = max(counts)
            starts, acc = [], 0
            for n in counts:
                starts.append(acc)
                acc += n
            # row r of image b (from starts[b]) goes to b * width + (r - starts[b])
            shift = self._repeat(self._host([b * width - s for b, s in enumerate(starts)]), counts)
            return torch.arange(acc, device=self.device) + shift
        return self.cached(("pad_rows", with_prefix), build)

    def pad_width(self, with_prefix: bool) -> int:
        return self.max_len if with_prefix else max(self.patch_counts)

    def key_padding_mask(self, with_prefix: bool) -> torch.Tensor:
        """(B, L_max) bool, True where the padded layout holds a real token."""
        def build():
            counts = self._host(self.lengths if with_prefix else self.patch_counts)
            width = self.pad_width(with_prefix)
            return torch.arange(width, device=self.device).view(1, -1) < counts.view(-1, 1)
        return self.cached(("key_padding_mask", with_prefix), build)

    # Index tensors of T rows are built on the device from per-image values: building them on
    # the host and copying costs milliseconds of CPU per batch (about 16 ms for the padded rows
    # of 8 images of 4096 tokens on the H200 machine), which the GPU then waits for.
    def _repeat_images(self, counts: Sequence[int]) -> torch.Tensor:
        return self._repeat(torch.arange(self.batch_size, device=self.device), counts)

    def _repeat(self, values: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """(B,) device values, each repeated counts[b] times; the output size is known on the
        host, so no sync."""
        return torch.repeat_interleave(values, self._host(counts), output_size=int(sum(counts)))

    def _host(self, values: Sequence[int]) -> torch.Tensor:
        return host_ints(values, self.device)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return to_device(t, self.device)


class StaticLayout:
    """The part of a :class:`PackedLayout` that attention reads, held in a device buffer, so that a
    captured CUDA graph can be replayed for other lengths.

    Ragged (``uniform`` False): ``offsets`` (B + 1,) int32 may be rewritten between replays and
    ``max_len`` bounds the lengths (it only sizes the kernel's grid). Uniform: B images of
    ``max_len`` rows, attended by the dense kernel.
    """

    def __init__(self, offsets: torch.Tensor, max_len: int, uniform: bool = False) -> None:
        self._offsets = offsets
        self.max_len = int(max_len)
        self.uniform = uniform
        self.batch_size = offsets.numel() - 1

    def offsets(self, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        if dtype != torch.int32:
            raise ValueError("a static layout holds int32 offsets only")
        return self._offsets


def pack_slots(padded: torch.Tensor, lengths: Sequence[int]) -> Tuple[torch.Tensor, PackedLayout]:
    """Image b's first ``lengths[b]`` slots of ``padded`` (B x N x C) as packed rows (T, C), and
    their layout (no prefix)."""
    b, n, c = padded.shape
    if len(lengths) != b or max(lengths) > n or min(lengths) < 0:
        raise ValueError(f"lengths {list(lengths)} do not fit {b} images of {n} token slots")
    layout = PackedLayout(lengths, 0, padded.device)
    width = layout.max_len
    return padded[:, :width].reshape(b * width, c).index_select(0, layout.pad_rows(False)), layout


def unpack_slots(rows: torch.Tensor, layout: PackedLayout, slots: int) -> torch.Tensor:
    """The inverse of :func:`pack_slots`: packed rows (T, D) -> B x ``slots`` x D, empty slots 0."""
    b, width = layout.batch_size, layout.max_len
    out = rows.new_zeros(b * width, rows.shape[1]).index_copy(0, layout.pad_rows(False), rows).view(b, width, -1)
    return torch.nn.functional.pad(out, (0, 0, 0, slots - width)) if width < slots else out
