"""A frozen policy network made fast for inference: BatchNorm folded into the convolutions before
it, weights and activations in channels-last memory.

Why: on one H200 (``scripts/profile_token_reduction.py``, 8 images of 1024 x 1024, bf16) the
EfficientNet-Lite0 policy as trained spent 12.4 ms of a CTS Segmenter's 23 ms per batch, about a
quarter of it in separate BatchNorm kernels and most of the rest in PyTorch's own NCHW depthwise
convolution. Folding removes the BatchNorm kernels; channels-last memory is the layout cuDNN's
fast depthwise kernels take. A frozen policy never updates its statistics, so the fold is exact
up to rounding. At batch 1 the network is launch-bound (some 250 kernels for a few ms of GPU work):
in fp16/bf16 inference :meth:`FastPolicy.window_logits` replays it as one CUDA graph per input
shape instead. With ``compile`` the copy's forward is also compiled (``torch.compile``, inductor):
cuDNN adds a convolution's bias in a pass of its own and the activation, the casts and the input
normalisation are more passes over memory; compiled, each run of them is one kernel.

:class:`FastPolicy` keeps the folded copy outside the module tree (no extra state-dict keys) and
rebuilds it (dropping its graphs) whenever a tensor of the policy changed in place (loading
weights) or the device did.
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch
import torch.nn as nn

from ...utils.cuda_graph import warm_and_capture

__all__ = ["FastPolicy", "fold_batchnorm"]


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv's weight and bias := those of conv followed by bn in eval mode (in place)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    w = conv.weight
    conv.weight = nn.Parameter((w * scale.view(-1, 1, 1, 1)).detach(), requires_grad=False)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.bias = nn.Parameter((bias * scale + shift).detach(), requires_grad=False)


def fold_batchnorm(module: nn.Module) -> Tuple[nn.Module, int]:
    """A copy of ``module`` in eval mode in which every BatchNorm2d that directly follows a Conv2d
    among its parent's children (timm's EfficientNet: conv_stem/bn1, conv_pw/bn1, conv_dw/bn2,
    conv_pwl/bn3, ...) is folded into it and replaced by its activation (timm's BatchNormAct2d) or
    an identity. Returns the copy and the number of folds."""
    fused = copy.deepcopy(module).eval()
    folds = 0
    for parent in fused.modules():
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                _fold(conv, bn)
                act = getattr(bn, "act", None)
                drop = getattr(bn, "drop", None)
                if drop is not None and not isinstance(drop, nn.Identity):
                    raise ValueError(f"{second}: a BatchNorm with dropout cannot be folded")
                parent._modules[second] = act if act is not None else nn.Identity()
                folds += 1
    return fused, folds


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    images: torch.Tensor  # static input
    logits: Dict[int, torch.Tensor]  # static outputs


class FastPolicy:
    """Holds the folded, channels-last copy of ``policy`` for CUDA inference (see the module
    docstring) and its CUDA graphs, at most ``max_graphs`` input shapes (least recently used out);
    ``compile`` compiles the copy's forward for the graphed path (a compilation that fails runs it
    uncompiled, with one warning)."""

    def __init__(self, max_graphs: int = 8, compile: bool = False) -> None:
        self.compile = bool(compile)
        self._forward: Optional[Callable] = None  # the copy's window_logits, compiled or not
        self._copy: Optional[nn.Module] = None
        self._key: Optional[Tuple] = None
        self._tensors: Optional[list] = None
        self._source: Optional[nn.Module] = None
        self.max_graphs = int(max_graphs)
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._pool = None
        #: graphs captured so far (benchmarks check that timed passes capture none)
        self.captures = 0

    def _stamp(self, policy: nn.Module, device: torch.device) -> Tuple:
        """What the copy was built from: the device, and the versions and storage of every tensor
        of ``policy`` (bumped by in-place loading, changed by moves). The tensor list is gathered
        once per policy (walking the module tree costs milliseconds per call); replacing a
        parameter object needs :meth:`reset`, which a module move already triggers."""
        if self._tensors is None or self._source is not policy:
            self._tensors, self._source = list(policy.parameters()) + list(policy.buffers()), policy
        return (str(device), tuple(t._version for t in self._tensors), tuple(t.data_ptr() for t in self._tensors))

    def get(self, policy: nn.Module, device: torch.device) -> nn.Module:
        """The fast copy of ``policy`` on ``device``, rebuilt when the policy's tensors changed."""
        key = self._stamp(policy, device)
        if self._copy is None or key != self._key:
            fused, _ = fold_batchnorm(policy)
            self._copy = fused.to(device=device, memory_format=torch.channels_last)
            self._forward = torch.compile(self._copy.window_logits, dynamic=False) if self.compile else self._copy.window_logits
            self._key = key
            self._graphs.clear()  # they read the old copy's weights
            self._pool = None
        return self._copy

    def window_logits(self, policy: nn.Module, images: torch.Tensor, pixel_mean: torch.Tensor,
                      pixel_std: torch.Tensor) -> Dict[int, torch.Tensor]:
        """``policy.window_logits`` (side -> B x 2 x rows x cols) by the fast copy, on CUDA images
        with gradients off; replayed from a CUDA graph under fp16/bf16 autocast or on half inputs."""
        fast = self.get(policy, images.device)
        x = images.contiguous(memory_format=torch.channels_last)
        cast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        if torch.is_grad_enabled() or (cast or x.dtype) not in (torch.float16, torch.bfloat16):
            return fast.window_logits(x, pixel_mean, pixel_std)
        key = (tuple(x.shape), x.dtype, str(x.device), cast, pixel_mean.data_ptr(), pixel_std.data_ptr())
        if torch.cuda.is_current_stream_capturing():
            # inside the capture of a larger graph (the whole network as one): the policy's kernels
            # become part of it, since a graph cannot be replayed while another is captured; the
            # compiled forward only where its shape was warmed up (a compilation cannot be captured)
            forward = self._forward if key in self._graphs else fast.window_logits
            return forward(x, pixel_mean, pixel_std)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, fast, x, pixel_mean, pixel_std, cast)
        else:
            self._graphs.move_to_end(key)
            captured.images.copy_(x)
        captured.graph.replay()
        return {n: t.clone() for n, t in captured.logits.items()}  # the next replay overwrites them

    def _capture(self, key: Hashable, fast: nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 cast: Optional[torch.dtype]) -> _Captured:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(False), torch.no_grad():  # plain buffers, writable in any mode
            images = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)

            def forward() -> Dict[int, torch.Tensor]:
                with torch.autocast("cuda", dtype=cast or torch.bfloat16, enabled=cast is not None, cache_enabled=False):
                    return self._forward(images, mean, std)

            def warmup() -> None:  # compilation and cuDNN's kernel choice happen here
                try:
                    forward()
                except Exception as exc:
                    if self._forward is fast.window_logits:
                        raise
                    warnings.warn(f"compiling the policy network failed ({type(exc).__name__}: {str(exc)[:200]}); "
                                  "it runs uncompiled", RuntimeWarning, stacklevel=5)
                    self.compile = False  # for good: a rebuilt copy (new weights) is not compiled again
                    self._forward = fast.window_logits
                    forward()

            graph, logits = warm_and_capture(forward, x.device, self._pool, warmup)
        self.captures += 1
        captured = self._graphs[key] = _Captured(graph, images, logits)
        return captured

    def reset(self) -> None:
        """Drop the copy and its graphs (after the policy's parameters moved or were replaced)."""
        self._copy, self._key, self._tensors, self._source, self._forward = None, None, None, None, None
        self._graphs.clear()
        self._pool = None

