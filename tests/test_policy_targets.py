"""CTS policy targets on constructed label maps: one class, several, ignore, image borders, batch padding."""
from __future__ import annotations

import pytest
import torch

from eco_m2f.modeling.policy import SUPERPATCH_SIZE, superpatch_grid, superpatch_targets

IGN = 255
S = SUPERPATCH_SIZE


def _label_map(fill: dict[tuple[int, int], torch.Tensor], rows: int = 2, cols: int = 2) -> torch.Tensor:
    """A rows x cols grid of superpatches of class 0, with the given superpatches replaced."""
    labels = torch.zeros(rows * S, cols * S, dtype=torch.int64)
    for (r, c), patch in fill.items():
        labels[r * S:(r + 1) * S, c * S:(c + 1) * S] = patch
    return labels


def _patch(value: int, other: int | None = None, pixels: int = 1) -> torch.Tensor:
    """A 32 x 32 superpatch of ``value`` whose last ``pixels`` pixels (row-major) are ``other``."""
    p = torch.full((S, S), value, dtype=torch.int64)
    if other is not None:
        p.view(-1)[-pixels:] = other
    return p


def test_constructed_superpatches_default_ignore_is_dont_care() -> None:
    labels = _label_map({
        (0, 0): _patch(3),                      # one class
        (0, 1): _patch(3, other=4),             # one pixel of another class: mixed
        (1, 0): _patch(IGN),                    # all ignore: one class
        (1, 1): _patch(5, other=IGN, pixels=500),  # a class and ignore: the class only
    })
    assert superpatch_targets(labels, IGN).tolist() == [[1, 0], [1, 1]]


def test_ignore_as_class() -> None:
    labels = _label_map({
        (0, 0): _patch(5, other=IGN, pixels=3),  # a class and ignore: two classes
        (0, 1): _patch(IGN),                     # all ignore: still one class
        (1, 0): _patch(2),
        (1, 1): _patch(IGN, other=IGN - 1),      # ignore and class 254
    })
    assert superpatch_targets(labels, IGN, ignore_as_class=True).tolist() == [[0, 1], [1, 0]]
    assert superpatch_targets(labels, IGN, ignore_as_class=False).tolist() == [[1, 1], [1, 1]]


def test_regions_cut_by_the_image_border_count_their_inside_pixels() -> None:
    # 40 x 70 pixels: a 2 x 3 grid whose last row and column are cut by the border
    labels = torch.zeros(40, 70, dtype=torch.int64)
    labels[32:, :] = 1            # the cut bottom row is class 1 only: uniform
    labels[:32, 64:] = 2          # the cut right column is class 2 only: uniform
    labels[33, 5] = 7             # one pixel of another class in the bottom-left cell: mixed
    assert superpatch_grid(40, 70) == (2, 3)
    targets = superpatch_targets(labels, IGN)
    assert targets.tolist() == [[1, 1, 1], [0, 1, 1]]
    # with the ignore label as a class, the border padding (ignore) makes every cut cell mixed
    assert superpatch_targets(labels, IGN, ignore_as_class=True).tolist() == [[1, 1, 0], [0, 0, 0]]


def test_batched_and_dtype_checks() -> None:
    a = _label_map({(0, 1): _patch(1, other=2)})
    b = _label_map({(1, 1): _patch(IGN, other=4, pixels=10)})
    stacked = superpatch_targets(torch.stack([a, b]).to(torch.uint8), IGN)
    assert stacked.dtype == torch.int64 and stacked.shape == (2, 2, 2)
    assert stacked.tolist() == [[[1, 0], [1, 1]], [[1, 1], [1, 1]]]
    with pytest.raises(TypeError, match="integer"):
        superpatch_targets(a.float())
    with pytest.raises(ValueError, match="H, W"):
        superpatch_targets(torch.zeros(5, dtype=torch.int64))


def test_model_targets_leave_batch_padding_out_of_the_loss(tmp_path) -> None:
    """Two images of different sizes in one batch: cells outside an image get no target."""
    from eco_m2f.config import get_cfg
    from eco_m2f.architectures import build_model

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "TokenSharingPolicy",
                         "MODEL.BACKBONE.NAME", "build_efficientnet_backbone", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    big = torch.zeros(64, 96, dtype=torch.int64)
    big[:, 40:] = 1  # column 1 (pixels 32..63) holds classes 0 and 1
    small = torch.full((40, 30), IGN, dtype=torch.int64)
    small[35:, :] = 6  # the bottom cut cell holds class 6 and ignore: uniform
    inputs = [{"image": torch.zeros(3, *big.shape, dtype=torch.uint8), "sem_seg": big},
              {"image": torch.zeros(3, *small.shape, dtype=torch.uint8), "sem_seg": small}]
    images = model.preprocess_image(inputs)
    targets = model.prepare_targets(inputs, images)
    assert targets.tolist() == [[[1, 0, 1], [1, 0, 1]], [[1, -100, -100], [1, -100, -100]]]
    with pytest.raises(KeyError, match="sem_seg"):
        model.prepare_targets([{"image": inputs[0]["image"], "file_name": "x.png"}], images)
