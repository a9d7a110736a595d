"""Our defaults equal the official config functions' (a YAML that leaves a key out means the same).

The expected values are written out from the official sources: Mask2Former's
``mask2former/config.py::add_maskformer2_config``, Detectron2's
``projects/DeepLab/deeplab/config.py::add_deeplab_config`` (Mask2Former's ``train_net.setup``
calls both) and, for the scheduler the official COCO configs rely on, Detectron2's
``config/defaults.py``.
"""
from __future__ import annotations

from typing import Any

import pytest

from eco_m2f.config import get_cfg

ADD_MASKFORMER2_CONFIG = {
    "INPUT.DATASET_MAPPER_NAME": "mask_former_semantic",
    "INPUT.COLOR_AUG_SSD": False,
    "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 1.0,
    "INPUT.SIZE_DIVISIBILITY": -1,
    "SOLVER.WEIGHT_DECAY_EMBED": 0.0,
    "SOLVER.OPTIMIZER": "ADAMW",
    "SOLVER.BACKBONE_MULTIPLIER": 0.1,
    "MODEL.MASK_FORMER.DEEP_SUPERVISION": True,
    "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT": 0.1,
    "MODEL.MASK_FORMER.CLASS_WEIGHT": 1.0,
    "MODEL.MASK_FORMER.DICE_WEIGHT": 1.0,
    "MODEL.MASK_FORMER.MASK_WEIGHT": 20.0,
    "MODEL.MASK_FORMER.NHEADS": 8,
    "MODEL.MASK_FORMER.DROPOUT": 0.1,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 2048,
    "MODEL.MASK_FORMER.ENC_LAYERS": 0,
    "MODEL.MASK_FORMER.DEC_LAYERS": 6,
    "MODEL.MASK_FORMER.PRE_NORM": False,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 256,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100,
    "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE": "res5",
    "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ": False,
    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON": True,
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON": False,
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": False,
    "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD": 0.0,
    "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD": 0.0,
    "MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": False,
    "MODEL.MASK_FORMER.SIZE_DIVISIBILITY": 32,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 256,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 0,
    "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": "BasePixelDecoder",
    "MODEL.SWIN.PRETRAIN_IMG_SIZE": 224,
    "MODEL.SWIN.PATCH_SIZE": 4,
    "MODEL.SWIN.EMBED_DIM": 96,
    "MODEL.SWIN.DEPTHS": [2, 2, 6, 2],
    "MODEL.SWIN.NUM_HEADS": [3, 6, 12, 24],
    "MODEL.SWIN.WINDOW_SIZE": 7,
    "MODEL.SWIN.MLP_RATIO": 4.0,
    "MODEL.SWIN.QKV_BIAS": True,
    "MODEL.SWIN.QK_SCALE": None,
    "MODEL.SWIN.DROP_RATE": 0.0,
    "MODEL.SWIN.ATTN_DROP_RATE": 0.0,
    "MODEL.SWIN.DROP_PATH_RATE": 0.3,
    "MODEL.SWIN.APE": False,
    "MODEL.SWIN.PATCH_NORM": True,
    "MODEL.SWIN.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.SWIN.USE_CHECKPOINT": False,
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": "MultiScaleMaskedTransformerDecoder",
    "INPUT.IMAGE_SIZE": 1024,
    "INPUT.MIN_SCALE": 0.1,
    "INPUT.MAX_SCALE": 2.0,
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": 4,
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": 8,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 112 * 112,
    "MODEL.MASK_FORMER.OVERSAMPLE_RATIO": 3.0,
    "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO": 0.75,
}

ADD_DEEPLAB_CONFIG = {
    "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 1.0,
    "SOLVER.POLY_LR_POWER": 0.9,
    "SOLVER.POLY_LR_CONSTANT_ENDING": 0.0,
    "MODEL.SEM_SEG_HEAD.LOSS_TYPE": "hard_pixel_mining",
    "MODEL.SEM_SEG_HEAD.PROJECT_FEATURES": ["res2"],
    "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS": [48],
    "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS": 256,
    "MODEL.SEM_SEG_HEAD.ASPP_DILATIONS": [6, 12, 18],
    "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT": 0.1,
    "MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV": False,
    "MODEL.RESNETS.RES4_DILATION": 1,
    "MODEL.RESNETS.RES5_MULTI_GRID": [1, 2, 4],
    "MODEL.RESNETS.STEM_TYPE": "deeplab",
}

# Detectron2's defaults that Mask2Former's configs rely on: the COCO schedule (steps at 327778
# and 355092 of 368750) is a multi-step one because no COCO file names a scheduler.
DETECTRON2 = {"SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR"}


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


@pytest.mark.parametrize("source", [ADD_MASKFORMER2_CONFIG, ADD_DEEPLAB_CONFIG, DETECTRON2],
                         ids=["add_maskformer2_config", "add_deeplab_config", "detectron2"])
def test_defaults_equal_the_official_config_functions(source):
    cfg = get_cfg()
    differ = {key: (_get(cfg, key), value) for key, value in source.items() if _get(cfg, key) != value}
    assert differ == {}, "ours vs official: " + repr(differ)


def test_encoder_heads_follow_the_decoder_heads_as_the_official_code_reads_them():
    from eco_m2f.modeling.pixel_decoder import MSDeformAttnPixelDecoder
    from eco_m2f.modeling.registry import ShapeSpec

    shapes = {f"res{i}": ShapeSpec(channels=32 * 2 ** (i - 2), stride=2 ** i) for i in range(2, 6)}
    cfg = get_cfg()
    head = cfg.MODEL.SEM_SEG_HEAD
    head.CONVS_DIM, head.MASK_DIM, head.TRANSFORMER_ENC_LAYERS = 32, 32, 1
    cfg.MODEL.MASK_FORMER.NHEADS = head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
    decoder = MSDeformAttnPixelDecoder(cfg, shapes)
    attn = decoder.transformer.encoder.layers[0].self_attn
    assert (attn.n_heads, attn.n_points) == (4, 4)
    assert decoder.transformer.encoder.layers[0].linear1.out_features == 1024  # the official constant
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.NHEADS=4"):
        MSDeformAttnPixelDecoder(cfg, shapes)
