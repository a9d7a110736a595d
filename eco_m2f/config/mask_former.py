"""Mask2Former's keys: ``add_maskformer2_config`` of the official code, with its defaults.

Every value below is the official default (``tests/test_config_defaults.py`` checks them one by
one): the official YAML files set most of them, and a file that leaves one out must mean what it
means in Mask2Former. Keys the project adds are marked as such.
"""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_maskformer2_config(cfg: CN) -> None:
    # ----------------------------------------------------------------- data
    # training mapper (registry DATASET_MAPPER): coco_panoptic_lsj, coco_instance_lsj, mask_former_panoptic,
    # mask_former_semantic, mask_former_instance, or sem_seg (image + sem_seg only: plain-ViT segmenters)
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    # photometric distortion (SSD's = mmseg's PhotoMetricDistortion): brightness +-32, contrast and
    # saturation x[0.5, 1.5], hue +-18 of OpenCV's 180 (+-36 degrees), each with probability 1/2
    cfg.INPUT.COLOR_AUG_SSD = False
    # > 0: pad training images bottom/right to a multiple of this (image: grey / pixel mean, label: ignore)
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # large-scale jitter (coco_*_lsj mappers): scale s ~ U(MIN_SCALE, MAX_SCALE) of IMAGE_SIZE;
    # MIN_SCALE / MAX_SCALE are also the ratio range of MIN_SIZE_TRAIN_SAMPLING "ratio_range"
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # --------------------------------------------------------------- solver
    # weight decay of embeddings (query features/positions, level embeddings)
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # "ADAMW" or "SGD"
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # learning-rate factor of the parameters under model.backbone
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # further learning-rate factors by parameter-name prefix, [[prefix, factor], ...], e.g.
    # [["token_reducer.", 10.0]] for the new heads of a fine-tuning; the longest prefix wins
    cfg.SOLVER.LR_MULTIPLIERS = []

    # ---------------------------------------------------------- mask former
    cfg.MODEL.MASK_FORMER = CN()
    # loss on every decoder layer's prediction, not only the last
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    # weight of the no-object class in the classification loss
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    # loss weights (and matching costs) of classification, dice and mask BCE
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 20.0
    # attention heads of the transformer decoder and of the pixel decoder's encoder
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    # dropout of the pixel decoder's encoder (the decoder's layers use none, as the official code)
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
    # FFN width of the transformer decoder
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    # encoder layers inside the transformer decoder (MaskFormer v1 only; 0 for Mask2Former)
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0
    # predictions of the transformer decoder: its layers + the one from the learnable queries
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 6
    # pre-norm decoder layers
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    # query and decoder width; number of queries
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    # what the transformer decoder reads; Mask2Former's configs set "multi_scale_pixel_decoder",
    # the only value MaskFormerHead supports
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    # project the decoder's inputs even when their width equals HIDDEN_DIM
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # the transformer decoder (TRANSFORMER_DECODER_REGISTRY)
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    # the model pads its batch to a multiple of this (-1: the backbone's size_divisibility)
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32
    # point-sampled mask loss: points per mask, oversampling and importance ratio (PointRend)
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75

    # inference: which outputs the model produces (its tasks) and the panoptic thresholds
    cfg.MODEL.MASK_FORMER.TEST = CN()
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.0
    # resize mask logits to the image before semantic inference (always for panoptic/instance)
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    # -------------------------------------------------------- pixel decoder
    # channels of the mask features
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    # layers of the deformable-attention encoder (ECO-M2F's exits are 1..this)
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 0
    # the pixel decoder (PIXEL_DECODER_REGISTRY); Mask2Former's configs set MSDeformAttnPixelDecoder
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "BasePixelDecoder"
    # backbone levels the encoder attends over
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    # sampling points per head and level (the official encoder always uses 4)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    # defined by the official code but never read there (its encoder uses MODEL.MASK_FORMER.NHEADS):
    # must equal NHEADS
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    # project key: the encoder's FFN width (the official code hard-codes 1024)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 1024
    # project key: "pytorch" (grid_sample reference, runs everywhere), "triton" (fused GPU
    # kernels) or "auto" (triton on CUDA when Triton is installed, else pytorch)
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL = "auto"
    # project key: True runs the pixel decoder in float32 even under autocast (official behaviour,
    # safe for fp16 training); False lets it follow autocast (bf16/fp16 linears and sampling; the
    # sampling locations stay float32), which is what makes bf16 inference fast
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_FP32 = True

    # ---------------------------------------------------- swin transformer
    # D2SwinTransformer's keys (Swin-T defaults)
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.QK_SCALE = None
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SWIN.USE_CHECKPOINT = False
