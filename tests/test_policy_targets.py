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


# ----------------------------------------------------------------------------- larger windows (dCTS)


def test_window_targets_per_size_on_constructed_label_maps() -> None:
    from eco_m2f.modeling.policy import window_grid, window_targets

    # 128 x 192 pixels: an 8 x 12 patch grid; 4 x 4 windows: 2 x 3; 8 x 8 windows: 1 x 1
    labels = torch.zeros(128, 192, dtype=torch.int64)
    labels[:64, 64:128] = 2          # window (0, 1) of 4 x 4: class 2 only
    labels[10, 70] = 3               # ... but for one pixel: mixed
    labels[64:, :64] = IGN           # window (1, 0): all ignore: one class
    labels[64:, 128:] = 5            # window (1, 2): class 5 and ignore: one class (ignore is don't care)
    labels[64:70, 128:] = IGN
    assert window_grid(128, 192, 4) == (2, 3) and window_grid(128, 192, 8) == (1, 1) and window_grid(128, 192, 16) == (0, 0)
    assert window_targets(labels, 4, IGN).tolist() == [[1, 0, 1], [1, 1, 1]]
    assert window_targets(labels, 4, IGN, ignore_as_class=True).tolist() == [[1, 0, 1], [1, 1, 0]]
    assert window_targets(labels, 8, IGN).tolist() == [[0]]  # classes 0, 2, 3 in the top-left 128 x 128
    assert window_targets(labels, 2, IGN).tolist() == superpatch_targets(labels, IGN).tolist()
    assert window_targets(labels, 16, IGN).shape == (0, 0)
    # 96 x 96 pixels: 3 stride-32 cells a side, so one 4 x 4 window a side; the third cell is left out
    assert window_grid(96, 96, 4) == (1, 1) and window_targets(torch.zeros(96, 96, dtype=torch.int64), 4).tolist() == [[1]]
