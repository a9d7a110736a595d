"""A ViT block's token-wise work as one function of tensors, so that one compilation serves every block.

Between two attentions a pre-norm timm ``Block`` runs: the output projection, LayerScale, the
residual add, ``norm2``, ``fc1``, GELU, ``fc2``, LayerScale, the residual add, and the next
block's ``norm1``. Eager PyTorch issues each elementwise step as its own pass over memory.
:func:`residual_mlp` writes that stretch as a plain function of the activations and the
block's tensors; compiled by ``torch.compile`` (inductor), the residual adds fuse into the
norms after them and the biases into GELU. The weights are arguments, not module state, and
the row count is marked dynamic, so one compilation serves every block of every stack of the
same width and every batch: the compile cost is paid once per process.

:class:`FusedBlocks` runs a stack this way on packed rows: the qkv projection, q/k norms and
the ragged attention stay eager (:func:`~.blocks.project_qkv`, :func:`~.attention.packed_attention`).
Uncompiled it computes exactly what :func:`~.blocks.run_block` computes (tested on CPU); it
covers the standard ViT block (LayerNorm norms, optional LayerScale, GELU MLP, no attention
gate or extra norms) and refuses others with the module that does not fit. Where compiling
fails (no working compiler, an unsupported torch), the stack runs the function uncompiled
instead, with one warning per process; later stacks then do not try again.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from timm.models.vision_transformer import Block

from .attention import packed_attention
from .blocks import check_block, project_qkv
from .packing import PackedLayout

__all__ = ["FusedBlocks", "compile_failure", "fusable", "residual_mlp"]

Backend = Union[bool, str, Callable]

#: Why compiling with a backend failed in this process (a failed backend is not tried again).
_COMPILE_FAILURES: Dict[Union[str, Callable], str] = {}


def residual_mlp(
    x: torch.Tensor,
    o: torch.Tensor,
    proj_w: torch.Tensor,
    proj_b: Optional[torch.Tensor],
    gamma1: Optional[torch.Tensor],
    norm2_w: Optional[torch.Tensor],
    norm2_b: Optional[torch.Tensor],
    fc1_w: torch.Tensor,
    fc1_b: Optional[torch.Tensor],
    fc2_w: torch.Tensor,
    fc2_b: Optional[torch.Tensor],
    gamma2: Optional[torch.Tensor],
    next_w: Optional[torch.Tensor],
    next_b: Optional[torch.Tensor],
    eps2: float,
    next_eps: float,
    has_next: bool,
    approximate: str,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """From the attention output ``o`` (T, C) to the block's output ``x`` (T, C) and, when
    ``has_next``, the next block's ``norm1`` of it (else None)."""
    channels = (x.shape[-1],)
    a = F.linear(o, proj_w, proj_b)
    if gamma1 is not None:
        a = a * gamma1
    x = x + a
    h = F.linear(F.layer_norm(x, channels, norm2_w, norm2_b, eps2), fc1_w, fc1_b)
    h = F.linear(F.gelu(h, approximate=approximate), fc2_w, fc2_b)
    if gamma2 is not None:
        h = h * gamma2
    x = x + h
    y = F.layer_norm(x, channels, next_w, next_b, next_eps) if has_next else None
    return x, y


def compile_failure(exc: Exception) -> str:
    """A compile error in one line: its type and the first two lines (dynamo: the backend, then its error)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' '.join(lines[:2])[:240]}"


@functools.lru_cache(maxsize=None)
def _compiled(backend: Union[str, Callable]) -> Callable:
    options = None
    if backend == "inductor":
        import torch._inductor.config as inductor_config

        # round intermediates to the activation dtype where eager would, so that fusing changes
        # no rounding step
        if hasattr(inductor_config, "emulate_precision_casts"):
            options = {"emulate_precision_casts": True}
    return torch.compile(residual_mlp, backend=backend, dynamic=False, options=options)


def _plain_layer_norm(norm: nn.Module) -> bool:
    return type(norm) in (nn.LayerNorm, _timm_layer_norm()) and len(norm.normalized_shape) == 1 and not getattr(norm, "_fast_norm", False)


@functools.lru_cache(maxsize=None)
def _timm_layer_norm() -> type:
    from timm.layers import LayerNorm

    return LayerNorm


def _inactive(module: nn.Module) -> bool:
    """Identity in inference: Identity, dropout, drop path."""
    return isinstance(module, (nn.Identity, nn.Dropout, DropPath))


def fusable(block: nn.Module) -> str:
    """Why :class:`FusedBlocks` cannot run ``block`` (empty string when it can)."""
    try:
        check_block(block)
    except TypeError as exc:
        return str(exc)
    attn, mlp = block.attn, block.mlp
    checks = [
        (_plain_layer_norm(block.norm1) and _plain_layer_norm(block.norm2), "norm1/norm2 must be LayerNorm over the channels"),
        (isinstance(attn.norm, nn.Identity) if hasattr(attn, "norm") else True, "attn.norm (scale_attn_norm) is not supported"),
        (getattr(attn, "gate", None) is None, "gated attention is not supported"),
        (isinstance(attn.proj, nn.Linear) and _inactive(attn.proj_drop), "attn.proj must be Linear"),
        (all(isinstance(m, (nn.Identity, LayerScale)) for m in (block.ls1, block.ls2)), "ls1/ls2 must be Identity or LayerScale"),
        (all(_inactive(m) for m in (block.drop_path1, block.drop_path2)), "drop paths must be Identity or DropPath"),
        (type(mlp) is Mlp, f"mlp must be timm's Mlp, got {type(mlp).__name__}"),
    ]
    if type(mlp) is Mlp:
        checks += [
            (type(mlp.act) is nn.GELU, f"mlp.act must be nn.GELU, got {type(mlp.act).__name__}"),
            (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear), "mlp.fc1/fc2 must be Linear"),
            (isinstance(mlp.norm, nn.Identity) and _inactive(mlp.drop1) and _inactive(mlp.drop2), "mlp.norm (scale_mlp_norm) is not supported"),
        ]
    for ok, reason in checks:
        if not ok:
            return f"{type(block).__name__}: {reason}"
    return ""


def _gamma(ls: nn.Module) -> Optional[torch.Tensor]:
    return ls.gamma if isinstance(ls, LayerScale) else None


def _tail_args(block: Block, following: Optional[Block]) -> tuple:
    """Arguments of :func:`residual_mlp` after ``x`` and ``o`` for ``block`` (``following``: the
    next block, whose norm1 closes the function, or None for the last)."""
    mlp = block.mlp
    nxt = following.norm1 if following is not None else block.norm2  # placeholder tensors when last
    return (
        block.attn.proj.weight, block.attn.proj.bias, _gamma(block.ls1),
        block.norm2.weight, block.norm2.bias,
        mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, _gamma(block.ls2),
        nxt.weight, nxt.bias, float(block.norm2.eps), float(nxt.eps), following is not None, mlp.act.approximate,
    )


class FusedBlocks:
    """Run ``blocks`` on packed rows with their token-wise work in :func:`residual_mlp`.

    Args:
        blocks: timm ViT blocks that :func:`fusable` accepts.
        compile: False runs :func:`residual_mlp` as written; True compiles it with inductor;
            a ``torch.compile`` backend (name or callable) compiles it with that backend.
            Compiled functions are shared by every ``FusedBlocks`` of the process.
    """

    def __init__(self, blocks: Sequence[nn.Module], compile: Backend = False) -> None:
        self.blocks: List[Block] = list(blocks)
        if not self.blocks:
            raise ValueError("FusedBlocks needs at least one block")
        for block in self.blocks:
            reason = fusable(block)
            if reason:
                raise TypeError(f"FusedBlocks cannot run this block: {reason}")
        self._backend = "inductor" if compile is True else compile
        #: True while the compiled function runs (False when not asked for, or after it failed)
        self.compiled = compile is not False and self._backend not in _COMPILE_FAILURES
        self.fn = _compiled(self._backend) if self.compiled else residual_mlp

    def __call__(self, x: torch.Tensor, layout: PackedLayout, attention: str = "auto") -> torch.Tensor:
        """Packed rows ``x`` (T, C) -> the rows after every block (T, C)."""
        if not self.compiled:
            return self._run(residual_mlp, x, layout, attention)
        try:
            return self._run(self.fn, x, layout, attention)
        except Exception as exc:  # compiling failed, or an error of the call itself
            out = self._run(residual_mlp, x, layout, attention)  # raises again unless it was the compiler
            self._give_up_compiling(exc)
            return out

    def _give_up_compiling(self, exc: Exception) -> None:
        self.compiled, self.fn = False, residual_mlp
        if self._backend not in _COMPILE_FAILURES:
            _COMPILE_FAILURES[self._backend] = compile_failure(exc)
            warnings.warn(f"compiling the ViT block function failed ({_COMPILE_FAILURES[self._backend]}); "
                          "the token runtime runs it uncompiled in this process", RuntimeWarning, stacklevel=3)

    def _run(self, fn: Callable, x: torch.Tensor, layout: PackedLayout, attention: str) -> torch.Tensor:
        rows = x.shape[0]
        y = self.blocks[0].norm1(x)
        for i, block in enumerate(self.blocks):
            attn = block.attn
            q, k, v = project_qkv(attn.qkv, y, attn.num_heads)  # each (T, H, D)
            q, k = attn.q_norm(q), attn.k_norm(k)
            o = packed_attention(q, k, v, layout, attention, 0.0, attn.scale).reshape(rows, -1)  # (T, H * D)
            following = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
            if fn is not residual_mlp:
                torch._dynamo.maybe_mark_dynamic(x, 0)
                torch._dynamo.maybe_mark_dynamic(o, 0)
            x, y = fn(x, o, *_tail_args(block, following))
        return x
