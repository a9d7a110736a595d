"""The one contract between a model and the rest of the project.

The engine, the evaluators, the FLOP counter, the benchmark and the scripts talk to a model
only through this class, never through one architecture's attribute names. Every
meta-architecture of ``META_ARCH_REGISTRY`` derives from it.

Call convention (DESIGN.md section 3): ``model(batched_inputs)``, a list of per-image dicts as
the dataset mappers make them (``"image"`` uint8 C x H x W, ``"height"``, ``"width"``, and in
training the targets). In training mode it returns a dict of named scalar losses; in eval mode
a list with one dict per image holding the outputs of :attr:`tasks` at the original size:

* ``"sem_seg"``: C x H x W class scores;
* ``"panoptic_seg"``: ``(id_map H x W int, segments_info list)`` (Detectron2's format);
* ``"instances"``: ``{"pred_masks": N x H x W bool, "scores": N, "pred_classes": N}``;
* ``"policy"``: rows x cols probabilities that each 32x32 superpatch of the network input holds
  one class (the CTS policy network; the grid of the resized input, not of the original size);
  a policy that also scores larger windows (dCTS) adds ``"policy_windows"``: side n -> its grid;
* ``"cost"`` (optional): the per-image cost record, a flat dict of numbers and lists of
  numbers, e.g. ``{}`` (a static model: "count my FLOPs"), ``{"exit": 3}`` (ECO-M2F) or
  ``{"tokens": 812, "gflops": 12.3}`` (token reduction). One generic efficiency evaluator
  (``eco_m2f.evaluation.efficiency``) aggregates whatever fields it holds; where a record has
  no ``"gflops"`` the evaluator counts them with fvcore through :meth:`network`, caching per
  (padded size, :meth:`cost_signature`).

A model is built by ``eco_m2f.architectures.build_model(cfg)``: ``cls(cfg)`` (no file is read
in a constructor), then :meth:`load_extra_weights`, then placement on ``MODEL.DEVICE``.
"""
from __future__ import annotations

from typing import Any, Dict, FrozenSet, Hashable, Iterable, List, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn

from .image_list import ImageList

__all__ = ["SegmentationModel", "TASKS"]

#: The output tasks a model can declare; evaluators are chosen from these and the dataset.
TASKS: Tuple[str, ...] = ("sem_seg", "panoptic_seg", "instances", "policy")


class SegmentationModel(nn.Module):
    """Base class of every meta-architecture.

    Args:
        cfg: the full config; ``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD`` (in the 0-255 range of
            ``INPUT.FORMAT``) normalise the images.
        size_divisibility: the padded batch's height and width are rounded up to a multiple of
            this (32 for Mask2Former, the patch size for a ViT); 0 or 1 pads only to the
            largest image.
        tasks: what the eval outputs hold, a subset of :data:`TASKS`.

    Subclasses implement ``forward`` (the call convention above) and :meth:`network`, and may
    override the hooks below; each has a default that suits a static model.
    """

    #: True when some parameters may get no gradient in a training step (e.g. encoder layers past
    #: a sampled exit): DDP then looks for unused parameters each step. False keeps DDP fast.
    find_unused_parameters: bool = False

    def __init__(self, cfg: Any, *, size_divisibility: int, tasks: Iterable[str]) -> None:
        super().__init__()
        tasks = frozenset(tasks)
        unknown = sorted(tasks - set(TASKS))
        if unknown:
            raise ValueError(f"{type(self).__name__} declares unknown tasks {unknown}; known: {list(TASKS)}")
        if not tasks:
            raise ValueError(f"{type(self).__name__} declares no output task; it must produce one of {list(TASKS)}")
        self._tasks: FrozenSet[str] = tasks
        self.size_divisibility = int(size_divisibility)
        self.input_format = str(cfg.INPUT.FORMAT)
        mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
        if len(mean) != len(std):
            raise ValueError(f"MODEL.PIXEL_MEAN ({len(mean)} values) and MODEL.PIXEL_STD ({len(std)}) differ in length")
        if any(s <= 0 for s in std):
            raise ValueError(f"MODEL.PIXEL_STD must be positive, got {std}")
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), False)

    # ------------------------------------------------------------------ plumbing
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def tasks(self) -> FrozenSet[str]:
        """The outputs of eval mode (keys of each per-image dict besides ``"cost"``)."""
        return self._tasks

    def preprocess_image(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """Normalise with the pixel mean/std and pad (bottom/right) to the size divisibility."""
        images = [x["image"].to(self.device, non_blocking=True) for x in batched_inputs]
        images = [(x.float() - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

    # ------------------------------------------------------------------ cost
    def network(self, images: torch.Tensor, cost: Optional[Mapping[str, Any]] = None) -> Any:
        """The network proper on a normalised, padded batch B x 3 x H x W (no pre/post-processing).

        This is what the FLOP counter traces and what the benchmark times. A model whose cost
        depends on the image decides its path here as in ``forward``; given ``cost`` (a record
        from an earlier eval output), it follows the path that record describes instead
        (ECO-M2F: the encoder exit), so that image's FLOPs can be counted again. Returns a
        tensor or a (nested) dict / list / tuple of tensors, everything the path computes that
        the outputs depend on (a JIT trace drops what no returned tensor uses).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement network(images, cost)")

    def flop_scopes(self) -> Dict[str, str]:
        """Report name -> module path (relative to the model) whose FLOPs are reported apart
        from the total, e.g. ``{"encoder": "sem_seg_head.pixel_decoder.transformer.encoder"}``."""
        return {}

    @property
    def dynamic_cost(self) -> bool:
        """True when an image's cost depends on its content (gated exits, token reduction):
        FLOPs are then counted per image, never cached per input size alone."""
        return False

    def cost_signature(self, cost: Mapping[str, Any]) -> Hashable:
        """What in a cost record, together with the padded input size, fixes the network's FLOPs.

        Images with equal (size, signature) cost the same, so one fvcore count serves them all.
        A static model returns None (one count per size); ECO-M2F returns the exit.
        """
        return None

    # ------------------------------------------------------------------ pictures
    @property
    def records_token_maps(self) -> bool:
        """True when :meth:`token_maps` can say what became of each patch token of an image
        (a token-reduction encoder: paused, stopped, shared, pruned); the demo draws them."""
        return False

    def token_maps(self, images: torch.Tensor) -> List[Dict[str, Any]]:
        """Per image of a normalised padded batch, name -> ``TokenMap`` (an h x w grid of values
        over the batch's patch grid, what each value means, a title); see
        :attr:`records_token_maps`."""
        raise NotImplementedError(f"{type(self).__name__} records no token maps")

    def benchmark_stages(self) -> Dict[str, Tuple[nn.Module, str]]:
        """Stage name -> (module, method name) whose GPU time the benchmark reports apart."""
        return {}

    # ------------------------------------------------------------------ training
    def on_train_iteration(self, iteration: int, max_iter: int) -> None:
        """Called by the engine before every training step with the 0-based iteration about to
        run: the place for schedules of thresholds, keep ratios, temperatures or teachers."""

    # ------------------------------------------------------------------ checkpoints
    def load_extra_weights(self) -> None:
        """Load the parts whose weights live in files of their own (e.g. an ECO-M2F gate trained
        apart), which the constructor only names. ``build_model`` calls it once, after
        construction; :meth:`keys_loaded_elsewhere` then lists what it filled."""

    def keys_loaded_elsewhere(self) -> Set[str]:
        """State-dict keys a checkpoint may lack because :meth:`load_extra_weights` filled them."""
        return set()
