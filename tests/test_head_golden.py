"""The head against the official implementation: golden outputs at every encoder exit, inference, key contract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eco_m2f.config import get_cfg, setup_cfg
from eco_m2f.modeling.heads import MaskFormerHead
from eco_m2f.modeling.postprocess import instance_inference, panoptic_inference, sem_seg_postprocess, semantic_inference
from eco_m2f.modeling.registry import ShapeSpec

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
GOLDEN = REFERENCE / "m2f_head_golden.pt"
KEYS = REFERENCE / "m2f_state_dict_keys.json"
ATOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.is_file():
        pytest.skip(f"{GOLDEN} not present")
    return torch.load(GOLDEN, weights_only=True)


def _golden_cfg(c):
    cfg = get_cfg()
    head = cfg.MODEL.SEM_SEG_HEAD
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.NUM_CLASSES = c["NUM_CLASSES"]
    head.CONVS_DIM = c["CONVS_DIM"]
    head.MASK_DIM = c["MASK_DIM"]
    head.COMMON_STRIDE = c["COMMON_STRIDE"]
    head.IN_FEATURES = list(c["IN_FEATURES"])
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = list(c["DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"])
    head.TRANSFORMER_ENC_LAYERS = c["TRANSFORMER_ENC_LAYERS"]
    head.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = c["ENC_DIM_FEEDFORWARD"]
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = c["ENC_NHEADS"]
    mf = cfg.MODEL.MASK_FORMER
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    mf.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    mf.HIDDEN_DIM = c["HIDDEN_DIM"]
    mf.NUM_OBJECT_QUERIES = c["NUM_OBJECT_QUERIES"]
    mf.NHEADS = c["NHEADS"]
    mf.DIM_FEEDFORWARD = c["DIM_FEEDFORWARD"]
    mf.DEC_LAYERS = c["DEC_LAYERS"]
    return cfg


@pytest.fixture(scope="module")
def head(golden):
    h, _ = golden["config"]["image_size"]
    shapes = {k: ShapeSpec(channels=v.shape[1], stride=h // v.shape[2]) for k, v in golden["features"].items()}
    model = MaskFormerHead(_golden_cfg(golden["config"]), shapes).eval()
    prefix = "sem_seg_head."
    state = {k[len(prefix):]: v for k, v in golden["state_dict"].items() if k.startswith(prefix)}
    assert len(state) == len(golden["state_dict"])
    model.load_state_dict(state, strict=True)
    return model


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def _check_predictions(out, ref, k, rows=slice(None)):
    _close(out["pred_logits"], ref["pred_logits"][rows], f"exit {k} pred_logits")
    _close(out["pred_masks"], ref["pred_masks"][rows], f"exit {k} pred_masks")
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == 3
    for i, (a, b) in enumerate(zip(out["aux_outputs"], ref["aux_outputs"])):
        _close(a["pred_logits"], b["pred_logits"][rows], f"exit {k} aux {i} pred_logits")
        _close(a["pred_masks"], b["pred_masks"][rows], f"exit {k} aux {i} pred_masks")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_golden_outputs_at_every_exit(golden, head, k):
    ref = golden["exits"][k]
    with torch.no_grad():
        mask_features, _, multi_scale = head.pixel_decoder.forward_features(golden["features"], exit_layer=k)
        out = head(golden["features"], exit_layer=k)
    _close(mask_features, ref["mask_features"], f"exit {k} mask_features")
    assert len(multi_scale) == len(ref["multi_scale_features"]) == 3
    for i, (a, b) in enumerate(zip(multi_scale, ref["multi_scale_features"])):
        _close(a, b, f"exit {k} multi_scale_features[{i}]")
    _check_predictions(out, ref, k)


def test_full_depth_is_the_default(golden, head):
    with torch.no_grad():
        out = head(golden["features"])
    _check_predictions(out, golden["exits"][6], 6)


def test_golden_multi_exit_and_per_image_exit(golden, head):
    with torch.no_grad():
        multi = head.forward_multi_exit(golden["features"], [1, 2, 3, 4, 5, 6])
        per_image = head.forward_per_image_exit(golden["features"], torch.tensor([5, 2]))
    for k, out in multi.items():
        _check_predictions(out, golden["exits"][k], k)
    _check_predictions({"pred_logits": per_image["pred_logits"][:1], "pred_masks": per_image["pred_masks"][:1],
                        "aux_outputs": [{n: v[:1] for n, v in a.items()} for a in per_image["aux_outputs"]]},
                       golden["exits"][5], 5, rows=slice(0, 1))
    _check_predictions({"pred_logits": per_image["pred_logits"][1:], "pred_masks": per_image["pred_masks"][1:],
                        "aux_outputs": [{n: v[1:] for n, v in a.items()} for a in per_image["aux_outputs"]]},
                       golden["exits"][2], 2, rows=slice(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_golden_on_gpu(golden, head):
    """The same numbers on a GPU with the pytorch deformable-attention core (TF32 off: fp32 contract)."""
    import copy

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        gpu_head = copy.deepcopy(head).cuda()
        features = {k: v.cuda() for k, v in golden["features"].items()}
        with torch.no_grad():
            multi = gpu_head.forward_multi_exit(features, [2, 6])
            per_image = gpu_head.forward_per_image_exit(features, torch.tensor([6, 2]))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    to_cpu = lambda out: {  # noqa: E731
        "pred_logits": out["pred_logits"].cpu(),
        "pred_masks": out["pred_masks"].cpu(),
        "aux_outputs": [{n: v.cpu() for n, v in a.items()} for a in out["aux_outputs"]],
    }
    for k, out in multi.items():
        _check_predictions(to_cpu(out), golden["exits"][k], k)
    per_image = to_cpu(per_image)
    for row, k in ((0, 6), (1, 2)):
        sel = {"pred_logits": per_image["pred_logits"][row : row + 1], "pred_masks": per_image["pred_masks"][row : row + 1],
               "aux_outputs": [{n: v[row : row + 1] for n, v in a.items()} for a in per_image["aux_outputs"]]}
        _check_predictions(sel, golden["exits"][k], k, rows=slice(row, row + 1))


def _same_panoptic(seg_a, info_a, seg_b, info_b):
    """Equal up to a renaming of segment ids: same regions, same category and thing flag per region."""
    assert seg_a.shape == seg_b.shape
    assert len(info_a) == len(info_b)
    by_id_b = {s["id"]: s for s in info_b}
    used = set()
    for s in info_a:
        region = seg_a == s["id"]
        ids_b = seg_b[region].unique().tolist()
        assert len(ids_b) == 1, f"segment {s} maps to several segments {ids_b}"
        t = by_id_b[ids_b[0]]
        assert torch.equal(seg_b == t["id"], region)
        assert (bool(s["isthing"]), int(s["category_id"])) == (bool(t["isthing"]), int(t["category_id"]))
        used.add(t["id"])
    assert torch.equal(seg_a == 0, seg_b == 0)
    assert len(used) == len(info_b)


def _golden_image0(golden):
    pp = golden["postprocess"]
    i = pp["image"]
    h, w = pp["size"]
    ref = golden["exits"][6]
    mask_pred = F.interpolate(ref["pred_masks"], size=(h, w), mode="bilinear", align_corners=False)[i]
    mask_pred = sem_seg_postprocess(mask_pred, (h, w), h, w)
    return pp, ref["pred_logits"][i], mask_pred


def test_golden_semantic_and_panoptic(golden):
    pp, mask_cls, mask_pred = _golden_image0(golden)
    num_classes = golden["config"]["NUM_CLASSES"]
    _close(semantic_inference(mask_cls, mask_pred), pp["sem_seg"], "sem_seg")
    seg, info = panoptic_inference(
        mask_cls, mask_pred, num_classes=num_classes, thing_ids=pp["thing_contiguous_ids"],
        object_mask_threshold=pp["object_mask_threshold"], overlap_threshold=pp["overlap_threshold"],
    )
    assert seg.dtype == torch.int32 and len(info) > 0
    _same_panoptic(seg, info, pp["panoptic_seg"], pp["segments_info"])


def test_golden_instances(golden):
    pp, mask_cls, mask_pred = _golden_image0(golden)
    ours = instance_inference(
        mask_cls, mask_pred, num_classes=golden["config"]["NUM_CLASSES"],
        test_topk_per_image=pp["test_topk_per_image"], thing_ids=pp["thing_contiguous_ids"],
    )
    ref = pp["instances"]
    assert ours["pred_masks"].dtype == torch.bool
    assert ours["pred_masks"].shape == ref["pred_masks"].shape
    # the official top-k leaves the order unspecified: match instances one to one
    unmatched = list(range(len(ref["scores"])))
    for j in range(len(ours["scores"])):
        hit = next(
            (
                i for i in unmatched
                if int(ref["pred_classes"][i]) == int(ours["pred_classes"][j])
                and abs(float(ref["scores"][i]) - float(ours["scores"][j])) <= ATOL
                and torch.equal(ref["pred_masks"][i] > 0.5, ours["pred_masks"][j])
            ),
            None,
        )
        assert hit is not None, f"instance {j} (class {int(ours['pred_classes'][j])}) has no official counterpart"
        unmatched.remove(hit)
    assert not unmatched
    assert set(ours["pred_classes"].tolist()) <= set(pp["thing_contiguous_ids"])


# ----------------------------------------------------------------------------- inference rules
def _logits(probs):
    return torch.log(torch.as_tensor(probs, dtype=torch.float32))


def test_panoptic_rules_on_a_handmade_case():
    # 4 classes (0, 1 things; 2, 3 stuff) + no-object; 5 queries on a 4x4 image
    mask_cls = _logits([
        [0.9, 0.02, 0.02, 0.02, 0.04],  # thing 0, left half
        [0.02, 0.02, 0.9, 0.02, 0.04],  # stuff 2, top-right
        [0.02, 0.02, 0.85, 0.02, 0.09],  # stuff 2 again, bottom-right: merged with the previous one
        [0.02, 0.02, 0.02, 0.04, 0.9],  # no object: dropped
        [0.3, 0.25, 0.15, 0.15, 0.15],  # thing 0 but covered by query 0: fails the overlap threshold
    ])
    big = 10.0
    masks = torch.full((5, 4, 4), -big)
    masks[0, :, :2] = big
    masks[1, :2, 2:] = big
    masks[2, 2:, 2:] = big
    masks[3] = big
    masks[4, :, :3] = big
    seg, info = panoptic_inference(mask_cls, masks, num_classes=4, thing_ids=[0, 1], object_mask_threshold=0.5, overlap_threshold=0.8)
    assert info == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 2}]
    expected = torch.zeros(4, 4, dtype=torch.int32)
    expected[:, :2] = 1
    expected[:, 2:] = 2
    assert torch.equal(seg, expected)
    # the object threshold drops everything: empty result
    seg, info = panoptic_inference(mask_cls, masks, num_classes=4, thing_ids=[0, 1], object_mask_threshold=0.95, overlap_threshold=0.8)
    assert info == [] and torch.all(seg == 0)


def test_semantic_and_instance_rules_on_a_handmade_case():
    mask_cls = _logits([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])  # 2 classes + no-object
    masks = torch.tensor([[[2.0, -2.0]], [[-1.0, 3.0]]])  # 2 queries on a 1x2 image
    sem = semantic_inference(mask_cls, masks)
    expected = torch.einsum("qc,qhw->chw", torch.tensor([[0.7, 0.2], [0.1, 0.6]]), masks.sigmoid())
    torch.testing.assert_close(sem, expected)

    inst = instance_inference(mask_cls, masks, num_classes=2, test_topk_per_image=3)
    # top-3 of the 4 (query, class) pairs: (0, 0) 0.7, (1, 1) 0.6, (0, 1) 0.2
    assert inst["pred_classes"].tolist() == [0, 1, 1]
    assert inst["pred_masks"].tolist() == [[[True, False]], [[False, True]], [[True, False]]]
    s0, s1 = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(3.0))
    torch.testing.assert_close(inst["scores"], torch.stack([0.7 * s0, 0.6 * s1, 0.2 * s0]), atol=1e-5, rtol=0)
    things_only = instance_inference(mask_cls, masks, num_classes=2, test_topk_per_image=3, thing_ids=[1])
    assert things_only["pred_classes"].tolist() == [1, 1]


def test_sem_seg_postprocess_crops_then_resizes():
    result = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6)
    out = sem_seg_postprocess(result, (2, 3), 4, 6)
    assert out.shape == (2, 4, 6)
    expected = F.interpolate(result[None, :, :2, :3], size=(4, 6), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(sem_seg_postprocess(result, (4, 6), 4, 6), result, atol=0, rtol=0)


# ----------------------------------------------------------------------------- key contract
CONFIGS = {
    "coco_panoptic_R50": ("configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml", [256, 512, 1024, 2048]),
    "coco_panoptic_swin_tiny": ("configs/coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml", [96, 192, 384, 768]),
    "cityscapes_panoptic_R50": ("configs/cityscapes/panoptic-segmentation/maskformer2_R50_bs16_90k.yaml", [256, 512, 1024, 2048]),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_head_state_dict_matches_official_keys(name):
    if not KEYS.is_file():
        pytest.skip(f"{KEYS} not present")
    config_file, channels = CONFIGS[name]
    reference = json.loads(KEYS.read_text())[name]["state_dict"]
    cfg = setup_cfg(str(REPO / config_file))
    shapes = {f"res{i + 2}": ShapeSpec(channels=c, stride=4 * 2**i) for i, c in enumerate(channels)}
    head = MaskFormerHead(cfg, shapes)
    ours = {"sem_seg_head." + k: list(v.shape) for k, v in head.state_dict().items()}
    theirs = {k: list(v) for k, v in reference.items() if k.startswith("sem_seg_head.")}
    assert sorted(set(ours) - set(theirs)) == [] and sorted(set(theirs) - set(ours)) == []
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {}
