"""What CTS and dCTS share: a frozen policy network scores windows of patches, the chosen windows
become one token each before the first block, and the decoder sees the live tokens.

The policy (:class:`~eco_m2f.modeling.meta_arch.token_sharing_policy.TokenSharingPolicy`) is a
child module (``token_reducer.policy.*``), frozen and in eval mode. Its structure comes from this
config, not from a file: ``MODEL.EFFICIENTNET.*``, ``MODEL.POLICY.{IN_FEATURE, WINDOW_SIZES}``
and its normalisation ``MODEL.TOKEN_SHARING.POLICY_PIXEL_MEAN / _STD`` (the defaults are those
of the policy configs). Its weights, ``MODEL.TOKEN_SHARING.POLICY_WEIGHTS``, are loaded by
:meth:`load_extra_weights` (the builder's step after construction); with
``MODEL.TOKEN_SHARING.POLICY_CONFIG`` set, that config must agree with the structure built here.
Without policy weights the policy's tensors come from ``MODEL.WEIGHTS`` (a trained CTS model).

The Segmenter's batch (normalised with its own pixel mean/std) is converted on the device to the
policy's normalisation. The policy's FLOPs (:meth:`TokenSharingPolicy.flops`, counted once per
input size) and the embedding's are charged to the cost records. When nothing can be shared
(no window wanted by the configuration), the policy does not run and the embedding is the ViT's
own: the model is then the dense Segmenter, exactly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ...meta_arch.token_sharing_policy import TokenSharingPolicy, check_window_sizes
from ...policy.inference import FastPolicy
from ..packing import HostCopy
from ..plugin import ReductionState, TokenReducer
from ..token_set import TokenSet
from ..window_sharing import SharedWindows, embed_prepared, embedding_flops, prepare_windows, resolve_windows

__all__ = ["SHARED_WINDOW_MAP", "WindowSharingReducer", "policy_config"]

#: Name of the token map of the window side of each cell's token.
SHARED_WINDOW_MAP = "shared window"
#: Keys of a policy config that fix the module structure and normalisation built here.
_STRUCTURE_KEYS = ("MODEL.BACKBONE.NAME", "MODEL.EFFICIENTNET.NAME", "MODEL.EFFICIENTNET.PAD_TYPE", "MODEL.EFFICIENTNET.BN_EPS",
                   "MODEL.EFFICIENTNET.OUT_FEATURES", "MODEL.POLICY_CNN.CHANNELS", "MODEL.POLICY_CNN.STRIDES",
                   "MODEL.POLICY.IN_FEATURE", "MODEL.POLICY.WINDOW_SIZES")
_POLICY_BACKBONES = ("build_efficientnet_backbone", "build_policy_cnn_backbone")


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def policy_config(cfg: Any) -> Any:
    """The policy's config from a token-sharing Segmenter's ``cfg`` (no file read)."""
    pc = cfg.clone()
    pc.defrost()
    ts = cfg.MODEL.TOKEN_SHARING
    if ts.POLICY_BACKBONE not in _POLICY_BACKBONES:
        raise ValueError(f"MODEL.TOKEN_SHARING.POLICY_BACKBONE {ts.POLICY_BACKBONE!r} is not one of {list(_POLICY_BACKBONES)}")
    pc.merge_from_list([
        "MODEL.META_ARCHITECTURE", "TokenSharingPolicy", "MODEL.BACKBONE.NAME", str(ts.POLICY_BACKBONE),
        "MODEL.BACKBONE.PRETRAINED", "False", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.WEIGHTS", "",
        "MODEL.PIXEL_MEAN", str(list(ts.POLICY_PIXEL_MEAN)), "MODEL.PIXEL_STD", str(list(ts.POLICY_PIXEL_STD)),
    ])
    pc.freeze()
    return pc


class WindowSharingReducer(TokenReducer):
    """Base of CTS and dCTS: subclasses set :attr:`window_sizes` and implement
    :meth:`active` and :meth:`wanted` (side -> B x h//n x w//n bool, from the policy's scores)."""

    output_kind = "tokens"

    def __init__(self, cfg: Any, backbone, head) -> None:
        super().__init__(cfg, backbone, head)
        self.window_sizes: Tuple[int, ...] = (2,)
        pc = policy_config(cfg)
        check_window_sizes(pc.MODEL.POLICY.WINDOW_SIZES)
        self.policy = TokenSharingPolicy(pc).freeze()
        self._policy_weights = str(cfg.MODEL.TOKEN_SHARING.POLICY_WEIGHTS)
        self._policy_config = str(cfg.MODEL.TOKEN_SHARING.POLICY_CONFIG)
        self._structure = {k: _get(pc, k) for k in _STRUCTURE_KEYS}
        self._structure.update({"MODEL.PIXEL_MEAN": list(pc.MODEL.PIXEL_MEAN), "MODEL.PIXEL_STD": list(pc.MODEL.PIXEL_STD)})
        self._policy_loaded = False
        # the Segmenter's own normalisation, which the policy converts from
        self.register_buffer("seg_pixel_mean", torch.tensor(list(cfg.MODEL.PIXEL_MEAN), dtype=torch.float32), False)
        self.register_buffer("seg_pixel_std", torch.tensor(list(cfg.MODEL.PIXEL_STD), dtype=torch.float32), False)
        self._policy_flops: Dict[Tuple[int, int], int] = {}
        self._fast_policy = FastPolicy(compile=bool(cfg.MODEL.TOKEN_SHARING.COMPILE_POLICY))  # not a module: no state-dict keys

    # ------------------------------------------------------------------ what subclasses decide
    def active(self) -> bool:
        """False when the configuration can share nothing (the policy then does not run)."""
        raise NotImplementedError

    def wanted(self, scores: Dict[int, torch.Tensor], grid: Tuple[int, int]) -> Tuple[Dict[int, torch.Tensor], Optional[List[List[int]]]]:
        """Policy scores (side -> B x h//n x w//n, float32) -> wanted windows, and the windows each
        image takes per size when known without looking (fixed budgets), else None."""
        raise NotImplementedError

    def cost_fields(self, state: ReductionState, taken: Sequence[Sequence[int]]) -> None:
        """Per-image cost fields from the windows taken per size (``taken[b][s]``)."""
        state.add_cost("shared", [[int(t) for t in row] for row in taken])

    # ------------------------------------------------------------------ checkpoints
    def load_extra_weights(self) -> None:
        """The policy's weights from ``MODEL.TOKEN_SHARING.POLICY_WEIGHTS`` (every tensor), after
        checking ``POLICY_CONFIG`` (when set) against the structure built from this config."""
        if self._policy_config:
            from ....config import setup_cfg

            other = setup_cfg(self._policy_config)
            if other.MODEL.META_ARCHITECTURE != "TokenSharingPolicy":
                raise ValueError(
                    f"MODEL.TOKEN_SHARING.POLICY_CONFIG {self._policy_config}: MODEL.META_ARCHITECTURE is "
                    f"{other.MODEL.META_ARCHITECTURE!r}; a policy config has 'TokenSharingPolicy'"
                )
            theirs = {k: _get(other, k) for k in _STRUCTURE_KEYS}
            theirs.update({"MODEL.PIXEL_MEAN": list(other.MODEL.PIXEL_MEAN), "MODEL.PIXEL_STD": list(other.MODEL.PIXEL_STD)})
            for key, value in theirs.items():
                ours = self._structure[key]
                same = [float(v) for v in value] == [float(v) for v in ours] if key.startswith("MODEL.PIXEL") else \
                    (list(value) == list(ours) if isinstance(value, (list, tuple)) else value == ours)
                if not same:
                    ours_key = key.replace("MODEL.PIXEL_", "MODEL.TOKEN_SHARING.POLICY_PIXEL_").replace(
                        "MODEL.BACKBONE.NAME", "MODEL.TOKEN_SHARING.POLICY_BACKBONE")
                    raise ValueError(
                        f"MODEL.TOKEN_SHARING.POLICY_CONFIG {self._policy_config} has {key} {value!r}, but this "
                        f"config builds the policy with {ours_key} {ours!r}; set it to the policy's value"
                    )
        if not self._policy_weights:
            return
        from ....checkpoint import load_weights

        load_weights(self.policy, self._policy_weights)
        self.policy.freeze()
        self._fast_policy.reset()
        self._policy_loaded = True

    def _apply(self, fn, *args, **kwargs):
        if "_fast_policy" in self.__dict__:  # the policy's tensors move or change: rebuild its fast copy
            self._fast_policy.reset()
        return super()._apply(fn, *args, **kwargs)

    def keys_loaded_elsewhere(self) -> Set[str]:
        if not self._policy_loaded:
            return set()
        return {f"policy.{k}" for k in self.policy.state_dict()}

    # ------------------------------------------------------------------ the loop
    def reduce(self, layer: int, tokens: TokenSet, state: ReductionState) -> TokenSet:
        raise RuntimeError(f"{type(self).__name__} acts before the first block only")

    def policy_scores(self, images: torch.Tensor, state: ReductionState) -> Dict[int, torch.Tensor]:
        """Side -> B x rows_n x cols_n P(one class) of the policy on the Segmenter's batch, its
        FLOPs charged."""
        with torch.no_grad():  # frozen: always in eval mode (TokenSharingPolicy.freeze)
            if images.is_cuda:  # BatchNorm folded, channels-last, CUDA graphs (policy/inference.py)
                logits = self._fast_policy.window_logits(self.policy, images, self.seg_pixel_mean, self.seg_pixel_std)
            else:
                logits = self.policy.window_logits(images, self.seg_pixel_mean, self.seg_pixel_std)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if size not in self._policy_flops:
            self._policy_flops[size] = self.policy.flops(*size)
        state.add_flops("token_reducer", self._policy_flops[size])
        return {n: logits[n].float().softmax(dim=1)[:, 1] for n in self.window_sizes}

    def embed(self, backbone, images: torch.Tensor, state: ReductionState) -> TokenSet:
        patch = backbone.patch_size
        grid = (-(-int(images.shape[-2]) // patch), -(-int(images.shape[-1]) // patch))  # ints, also when traced
        b = state.batch_size
        if not self.active() or all(grid[0] // n == 0 or grid[1] // n == 0 for n in self.window_sizes):
            return self._dense(backbone, images, state)
        scores = self.policy_scores(images, state)
        scores = {n: s[:, : grid[0] // n, : grid[1] // n] for n, s in scores.items()}  # windows inside the grid
        wanted, taken = self.wanted(scores, grid)
        windows = resolve_windows(wanted, grid)
        # the token counts depend on the scores: their copy to the host is queued, then every
        # embedding of fixed shape, and only then does the host wait for them (one sync)
        pending = HostCopy(windows.taken) if taken is None else None
        prepared = prepare_windows(backbone, images, windows)
        if pending is not None:
            taken = pending.wait()
        state.add_flops("backbone", [embedding_flops(backbone, grid, windows.sizes)] * b)
        tokens = embed_prepared(prepared, taken)
        self._record(state, taken, windows)
        return tokens

    def _dense(self, backbone, images: torch.Tensor, state: ReductionState) -> TokenSet:
        """Nothing can be shared: the ViT's own embedding, one token per patch (the policy does not run)."""
        tokens = super().embed(backbone, images, state)
        self._record(state, [[0] * len(self.window_sizes)] * state.batch_size, None, tokens)
        return tokens

    def _record(self, state: ReductionState, taken, windows: Optional[SharedWindows], tokens: Optional[TokenSet] = None) -> None:
        self.cost_fields(state, taken)
        if state.record_maps:
            side = windows.side if windows is not None else torch.ones_like(tokens.owner)
            state.token_maps[SHARED_WINDOW_MAP] = side
            labels = {1: "own token"}
            labels.update({n: f"{n}x{n} shared" for n in self.window_sizes})
            state.token_map_labels[SHARED_WINDOW_MAP] = labels
