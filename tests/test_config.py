"""Config loading: Detectron2/Mask2Former YAML files load unchanged, unknown keys fail loudly."""
from __future__ import annotations

from pathlib import Path

import pytest

from eco_m2f.config import ConfigKeyError, get_cfg, setup_cfg

REPO = Path(__file__).resolve().parents[1]


def test_unknown_key_on_command_line_names_key_and_suggestion():
    cfg = get_cfg()
    with pytest.raises(ConfigKeyError) as err:
        cfg.merge_from_list(["MODEL.MASK_FORMER.NUM_OBJECT_QUERY", "5"])
    msg = str(err.value)
    assert "MODEL.MASK_FORMER.NUM_OBJECT_QUERY" in msg
    assert "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES" in msg


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("SOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(ConfigKeyError) as err:
        setup_cfg(str(f))
    msg = str(err.value)
    assert "SOLVER.BASE_LRR" in msg and "SOLVER.BASE_LR" in msg and str(f) in msg


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.5\n  MAX_ITER: 7\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 9\n")
    cfg = setup_cfg(str(tmp_path / "child.yaml"), ["SOLVER.IMS_PER_BATCH", "3", "MODEL.ECO.EXITS", "[3, 6]"])
    assert cfg.SOLVER.BASE_LR == 0.5  # from the base
    assert cfg.SOLVER.MAX_ITER == 9  # child wins
    assert cfg.SOLVER.IMS_PER_BATCH == 3  # CLI, parsed as int
    assert list(cfg.MODEL.ECO.EXITS) == [3, 6]


def test_override_type_mismatch_fails():
    cfg = get_cfg()
    with pytest.raises(ValueError):
        cfg.merge_from_list(["SOLVER.MAX_ITER", "'many'"])


def test_odd_override_list_fails():
    with pytest.raises(ValueError, match="KEY VALUE"):
        get_cfg().merge_from_list(["SOLVER.MAX_ITER"])


def test_missing_config_file_named():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        setup_cfg("nope.yaml")


OFFICIAL_SWIN_T = """\
_BASE_: ../maskformer2_R50_bs16_50ep.yaml
MODEL:
  BACKBONE:
    NAME: "D2SwinTransformer"
  SWIN:
    EMBED_DIM: 96
    DEPTHS: [2, 2, 6, 2]
    NUM_HEADS: [3, 6, 12, 24]
    WINDOW_SIZE: 7
    APE: False
    DROP_PATH_RATE: 0.3
    PATCH_NORM: True
  WEIGHTS: "swin_tiny_patch4_window7_224.pkl"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
INPUT:
  MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * 1024) for x in range(5, 21)]"]
"""


def test_official_style_yaml_with_python_tag_loads(tmp_path):
    # An official file next to our R50 model file, with the python-eval tag official configs use.
    swin = REPO / "configs/coco/panoptic-segmentation/swin"
    f = tmp_path / "swin" / "maskformer2_swin_tiny_bs16_50ep.yaml"
    f.parent.mkdir()
    f.write_text(OFFICIAL_SWIN_T.replace("../maskformer2_R50_bs16_50ep.yaml", str(swin.parent / "maskformer2_R50_bs16_50ep.yaml")))
    cfg = setup_cfg(str(f))
    assert cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer"
    assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == "MSDeformAttnPixelDecoder"
    assert list(cfg.INPUT.MIN_SIZE_TRAIN)[:2] == [512, 614]
    assert cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON is True


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_project_config_loads(path):
    cfg = setup_cfg(str(REPO / path))
    assert cfg.MODEL.META_ARCHITECTURE
