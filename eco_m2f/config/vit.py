"""Keys of the plain-ViT semantic segmenters (``MODEL.META_ARCHITECTURE: "Segmenter"``).

``MODEL.VIT`` is the backbone, ``MODEL.SEM_SEG_HEAD.*`` the decode head chosen by
``MODEL.SEM_SEG_HEAD.NAME`` (plus its auxiliary heads), ``TEST.SLIDE`` the sliding-window
inference. Defaults are ViT-B/16 and the Segmenter recipe; the shipped configs set the
official sizes (DESIGN.md section 6).
"""
from __future__ import annotations

from .config_node import CfgNode as CN


def add_vit_config(cfg: CN) -> None:
    # ------------------------------------------------------------------ backbone
    cfg.MODEL.VIT = CN()
    # A timm model name (e.g. "vit_small_patch16_384", "deit_base_distilled_patch16_384") whose
    # architecture is built; "" builds it from the keys below. With a name, EMBED_DIM, DEPTH,
    # NUM_HEADS, MLP_RATIO, PATCH_SIZE, QKV_BIAS and DISTILLED come from timm and are not read.
    cfg.MODEL.VIT.NAME = ""
    # Input size (square) whose patch grid the stored position embedding covers: 512 for the
    # official ADE20K Segmenter checkpoints, 768 for Cityscapes. Any other input size gets the
    # embedding resized bilinearly to its grid; checkpoints of another grid are resized on load.
    cfg.MODEL.VIT.IMG_SIZE = 224
    cfg.MODEL.VIT.PATCH_SIZE = 16
    cfg.MODEL.VIT.EMBED_DIM = 768  # ViT-Ti 192, S 384, B 768, L 1024
    cfg.MODEL.VIT.DEPTH = 12  # ViT-L 24
    cfg.MODEL.VIT.NUM_HEADS = 12  # ViT-Ti 3, S 6, B 12, L 16
    cfg.MODEL.VIT.MLP_RATIO = 4.0
    cfg.MODEL.VIT.QKV_BIAS = True
    # Stochastic depth, growing linearly over the blocks from 0 to this value.
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1
    # LayerNorm epsilon of the encoder: official Segmenter checkpoints use 1e-5, timm 1e-6.
    cfg.MODEL.VIT.LN_EPS = 1e-6
    # A distillation token after the class token (DeiT distilled models): 2 prefix tokens.
    cfg.MODEL.VIT.DISTILLED = False
    # 0-based blocks whose outputs are kept (negative counts from the end): the levels of the
    # ATM head and the inputs of auxiliary heads. The final normalised tokens are always kept.
    cfg.MODEL.VIT.OUT_INDICES = [-1]
    # Activation checkpointing of every block in training (less memory, ~30% more time).
    cfg.MODEL.VIT.USE_CHECKPOINT = False

    # ------------------------------------------------------------------ decode heads
    head = cfg.MODEL.SEM_SEG_HEAD
    # 0-based blocks (each also in MODEL.VIT.OUT_INDICES) that get an auxiliary head with its
    # own weights during training (SETR: [9, 14, 19] of ViT-L); not run at inference.
    head.AUX_LAYERS = []
    # Registered head of the auxiliary heads; "" = the same kind as MODEL.SEM_SEG_HEAD.NAME.
    head.AUX_NAME = ""
    # Weight of each auxiliary head's loss (the main head's is MODEL.SEM_SEG_HEAD.LOSS_WEIGHT).
    head.AUX_LOSS_WEIGHT = 0.4

    # Segmenter's mask transformer (SegmenterMaskTransformerHead).
    head.MASK_TRANSFORMER = CN()
    head.MASK_TRANSFORMER.NUM_LAYERS = 2
    head.MASK_TRANSFORMER.HIDDEN_DIM = 0  # 0 = the encoder's width (official)
    head.MASK_TRANSFORMER.NUM_HEADS = 0  # 0 = HIDDEN_DIM // 64 (official), at least 1
    head.MASK_TRANSFORMER.MLP_RATIO = 4.0
    head.MASK_TRANSFORMER.DROPOUT = 0.1
    head.MASK_TRANSFORMER.DROP_PATH_RATE = 0.0

    # SETR decoders (SETRNaiveHead, SETRPUPHead): LayerNorm, then NUM_CONVS x (conv KERNEL_SIZE
    # to CHANNELS + BatchNorm + ReLU + bilinear x UP_SCALE), then a 1x1 classifier. Naive is one
    # 1x1 conv without upsampling; PUP uses every key (SETR: 4 convs 3x3, x2 each; PAUMER's
    # ViT-Ti variant: 192 channels, 2 convs, x4 each).
    head.SETR = CN()
    head.SETR.CHANNELS = 256
    head.SETR.NUM_CONVS = 4
    head.SETR.KERNEL_SIZE = 3
    head.SETR.UP_SCALE = 2
    # Auxiliary heads (both kinds) are shallower (SETR: 2 convs, x4 each).
    head.SETR.AUX_NUM_CONVS = 2
    head.SETR.AUX_UP_SCALE = 4
    head.SETR.DROPOUT = 0.0  # dropout before the classifier
    head.SETR.LN_EPS = 1e-6

    # SegViT's attention-to-mask decoder (ATMHead): one level per MODEL.VIT.OUT_INDICES entry
    # (deepest first), one query per class, masks of the levels summed.
    head.ATM = CN()
    head.ATM.HIDDEN_DIM = 384  # ViT-B 384, ViT-L 512
    head.ATM.NUM_LAYERS = 3  # decoder layers per level
    head.ATM.NUM_HEADS = 12
    head.ATM.MLP_RATIO = 4.0
    head.ATM.DROPOUT = 0.1
    head.ATM.CLASS_WEIGHT = 1.0  # cross-entropy of the class logits
    head.ATM.MASK_WEIGHT = 20.0  # sigmoid focal loss of the masks
    head.ATM.DICE_WEIGHT = 1.0
    head.ATM.NO_OBJECT_WEIGHT = 0.1  # class weight of "no object" (a class absent from the image)
    head.ATM.FOCAL_ALPHA = 0.25
    head.ATM.FOCAL_GAMMA = 2.0

    # ------------------------------------------------------------------ token reduction
    cfg.MODEL.TOKEN_REDUCTION = CN()
    # Registered token-reduction method that takes over the Segmenter's encoder loop; "" = dense.
    cfg.MODEL.TOKEN_REDUCTION.NAME = ""
    # Attention of the token runtime over images that keep different numbers of tokens: "auto"
    # (the flash varlen kernel on CUDA, SDPA with a key-padding mask on CPU), "padded",
    # "jagged", "flash", "varlen" or "flex" (eco_m2f/modeling/token_reduction/attention.py).
    cfg.MODEL.TOKEN_REDUCTION.ATTENTION = "auto"
    # In fp16/bf16 inference on CUDA, replay each run of blocks between two reductions as one
    # CUDA graph (GraphedBlocks); only with ATTENTION "auto", "flash" or "varlen".
    cfg.MODEL.TOKEN_REDUCTION.CUDA_GRAPHS = True
    # With CUDA_GRAPHS, capture a decision (DoViT's, DToP's and STEP's with linear auxiliary heads,
    # PAUMER's pause steps) in the graph of the blocks before it, so that only a threshold
    # decision's per-image counts wait for the host (token_reduction/static_decision.py); the same
    # decisions, measured faster in the trained sweeps (README, run 7).
    cfg.MODEL.TOKEN_REDUCTION.GRAPH_DECISIONS = True
    # With GRAPH_DECISIONS, compile each captured decision (torch.compile, inductor) so that its
    # small kernels replay fused; a failing compiler runs it uncompiled with one warning. Off
    # until timed.
    cfg.MODEL.TOKEN_REDUCTION.COMPILE_DECISIONS = False
    # With CUDA_GRAPHS, replay a token-wise decode head (mask transformer, linear) on the dense
    # token grid that PAUMER and DoViT hand back as one CUDA graph (token_reduction/graphed_head.py):
    # after a pass's last decision the host has waited for the GPU, and the head's eager kernels
    # would keep it idle. Live tokens whose counts follow the content (dynamic CTS, dCTS, DToP,
    # STEP) go through the mask transformer's packed rows in a graph per row bucket.
    cfg.MODEL.TOKEN_REDUCTION.GRAPH_HEAD = True

    # ------------------------------------------------------------------ inference
    # Sliding-window inference: CROP_SIZE windows every STRIDE pixels (the last one flush with
    # the border), class logits averaged where windows overlap; windows of all images of a
    # batch run BATCH_SIZE at a time (0 = all at once). Off: the whole (padded) image at once.
    cfg.TEST.SLIDE = CN()
    cfg.TEST.SLIDE.ENABLED = False
    cfg.TEST.SLIDE.CROP_SIZE = [512, 512]  # (height, width), multiples of the patch size
    cfg.TEST.SLIDE.STRIDE = [512, 512]
    cfg.TEST.SLIDE.BATCH_SIZE = 16

    # ------------------------------------------------------------------ solver
    # Layer-wise learning-rate decay of ViT backbones: block i gets lr x LAYER_DECAY^(depth - i),
    # the embeddings LAYER_DECAY^(depth + 1), the final norm and the heads the full rate. 1.0 = off.
    cfg.SOLVER.LAYER_DECAY = 1.0
