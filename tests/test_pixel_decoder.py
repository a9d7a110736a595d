"""Pixel decoder: shapes at every exit, multi-exit and per-image exits equal separate runs, sine encoding."""
from __future__ import annotations

import pytest
import torch

from eco_m2f.config import get_cfg
from eco_m2f.modeling.heads import MaskFormerHead
from eco_m2f.modeling.pixel_decoder import MSDeformAttnPixelDecoder, PositionEmbeddingSine
from eco_m2f.modeling.registry import PIXEL_DECODER_REGISTRY, ShapeSpec

CHANNELS = {"res2": 16, "res3": 24, "res4": 40, "res5": 48}
IMAGE_HW = (64, 96)
NUM_LAYERS = 4


def _cfg():
    cfg = get_cfg()
    head = cfg.MODEL.SEM_SEG_HEAD
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.CONVS_DIM = 32
    head.MASK_DIM = 16
    head.NUM_CLASSES = 5
    head.TRANSFORMER_ENC_LAYERS = NUM_LAYERS
    head.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 64
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 32
    cfg.MODEL.MASK_FORMER.NHEADS = 4
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 6
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 64
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 3
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    return cfg


def _shapes():
    return {k: ShapeSpec(channels=c, stride=4 * 2**i) for i, (k, c) in enumerate(CHANNELS.items())}


def _features(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    return {k: torch.randn(batch, c, h // (4 * 2**i), w // (4 * 2**i), generator=g) for i, (k, c) in enumerate(CHANNELS.items())}


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (the official init zeroes the attention weights and offsets)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def decoder() -> MSDeformAttnPixelDecoder:
    torch.manual_seed(0)
    dec = PIXEL_DECODER_REGISTRY.get("MSDeformAttnPixelDecoder")(_cfg(), _shapes()).eval()
    _randomise(dec)
    return dec


def _assert_triple_close(a, b, atol):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=0)
    assert len(a[2]) == len(b[2]) == 3
    for x, y in zip(a[2], b[2]):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("k", [None, *range(1, NUM_LAYERS + 1)])
def test_shapes_at_every_exit(decoder, k):
    h, w = IMAGE_HW
    with torch.no_grad():
        mask_features, encoder_out, multi_scale = decoder.forward_features(_features(2), exit_layer=k)
    assert mask_features.shape == (2, 16, h // 4, w // 4)
    assert encoder_out.shape == (2, 32, h // 32, w // 32)
    assert [tuple(x.shape) for x in multi_scale] == [(2, 32, h // s, w // s) for s in (32, 16, 8)]
    assert mask_features.dtype == torch.float32


def test_exits_change_the_output(decoder):
    with torch.no_grad():
        outs = [decoder.forward_features(_features(1), exit_layer=k)[0] for k in range(1, NUM_LAYERS + 1)]
        full = decoder.forward_features(_features(1))[0]
    torch.testing.assert_close(outs[-1], full, atol=0, rtol=0)
    for a, b in zip(outs, outs[1:]):
        assert (a - b).abs().max() > 1e-3


def test_encoder_token_length_is_constant(decoder):
    lengths = []
    hooks = [layer.register_forward_hook(lambda m, i, o: lengths.append((i[0].shape, o.shape))) for layer in decoder.transformer.encoder.layers]
    try:
        with torch.no_grad():
            decoder.forward_features(_features(2))
    finally:
        for hk in hooks:
            hk.remove()
    h, w = IMAGE_HW
    tokens = sum((h // s) * (w // s) for s in (8, 16, 32))
    assert len(lengths) == NUM_LAYERS
    assert all(tuple(i) == tuple(o) == (2, tokens, 32) for i, o in lengths)


def test_bad_exit_and_missing_features(decoder):
    with pytest.raises(ValueError, match="exit_layer"):
        decoder.forward_features(_features(1), exit_layer=0)
    with pytest.raises(ValueError, match="exit_layer"):
        decoder.forward_features(_features(1), exit_layer=NUM_LAYERS + 1)
    feats = _features(1)
    del feats["res2"]
    with pytest.raises(KeyError, match="res2"):
        decoder.forward_features(feats)
    with pytest.raises(ValueError, match="one per image"):
        decoder.forward_features_per_image_exit(_features(2), torch.tensor([1, 2, 3]))


def test_project_inputs_gives_the_gate_input(decoder):
    feats = _features(3)
    with torch.no_grad():
        inputs = decoder.project_inputs(feats)
        s1 = decoder.input_proj[0](feats["res5"])
    h, w = IMAGE_HW
    assert inputs.s1.shape == (3, 32, h // 32, w // 32)
    torch.testing.assert_close(inputs.s1, s1, atol=0, rtol=0)
    assert inputs.spatial_shapes == [(h // 32, w // 32), (h // 16, w // 16), (h // 8, w // 8)]
    assert inputs.src.shape == (3, sum(a * b for a, b in inputs.spatial_shapes), 32)
    # the res5 tokens come first in the encoder's sequence
    torch.testing.assert_close(inputs.src[:, : (h // 32) * (w // 32)], s1.flatten(2).transpose(1, 2), atol=0, rtol=0)
    # precomputed inputs (the gate's) can be handed to every forward instead of projecting twice
    with torch.no_grad():
        _assert_triple_close(decoder.forward_features(feats, 2, inputs=inputs), decoder.forward_features(feats, 2), atol=0)
        _assert_triple_close(
            decoder.forward_features_multi_exit(feats, [3], inputs=inputs)[3], decoder.forward_features(feats, 3), atol=0
        )
        _assert_triple_close(
            decoder.forward_features_per_image_exit(feats, torch.tensor([1, 1, 1]), inputs=inputs),
            decoder.forward_features(feats, 1),
            atol=1e-6,
        )


def test_multi_exit_equals_separate_runs(decoder):
    feats = _features(2, seed=1)
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o: calls.append(1)) for layer in decoder.transformer.encoder.layers]
    try:
        with torch.no_grad():
            multi = decoder.forward_features_multi_exit(feats, [3, 1, NUM_LAYERS, 3])
    finally:
        for hk in hooks:
            hk.remove()
    assert list(multi) == [1, 3, NUM_LAYERS]
    assert len(calls) == NUM_LAYERS  # one cumulative pass through the encoder
    with torch.no_grad():
        for k, triple in multi.items():
            _assert_triple_close(triple, decoder.forward_features(feats, exit_layer=k), atol=1e-6)


@pytest.mark.parametrize("exits", [[3, 1, 4, 1, 2], [2, 2, 2, 2, 2], [4, 3, 2, 1, 4]])
def test_per_image_exit_equals_per_image_runs(decoder, exits):
    batch = len(exits)
    feats = _features(batch, seed=2)
    batch_sizes = {}

    def record(idx):
        return lambda m, i, o: batch_sizes.setdefault(idx, []).append(i[0].shape[0])

    hooks = [layer.register_forward_hook(record(j + 1)) for j, layer in enumerate(decoder.transformer.encoder.layers)]
    try:
        with torch.no_grad():
            out = decoder.forward_features_per_image_exit(feats, torch.tensor(exits))
    finally:
        for hk in hooks:
            hk.remove()
    # layer j runs once, on exactly the images whose exit is >= j
    for j in range(1, NUM_LAYERS + 1):
        n_active = sum(e >= j for e in exits)
        assert batch_sizes.get(j, []) == ([n_active] if n_active else [])
    with torch.no_grad():
        for b, k in enumerate(exits):
            single = decoder.forward_features({n: f[b : b + 1] for n, f in feats.items()}, exit_layer=k)
            _assert_triple_close((out[0][b : b + 1], out[1][b : b + 1], [x[b : b + 1] for x in out[2]]), single, atol=1e-5)


def test_per_image_exit_backward_reaches_only_used_layers(decoder):
    decoder.zero_grad(set_to_none=True)
    feats = _features(2, seed=3)
    out = decoder.forward_features_per_image_exit(feats, torch.tensor([1, 2]))
    (out[0].square().mean() + sum(x.mean() for x in out[2])).backward()
    layers = decoder.transformer.encoder.layers
    assert layers[0].linear1.weight.grad is not None and layers[0].linear1.weight.grad.abs().sum() > 0
    assert layers[1].linear1.weight.grad is not None
    assert all(p.grad is None for layer in layers[2:] for p in layer.parameters())
    decoder.zero_grad(set_to_none=True)


def test_encoder_stays_float32_under_autocast(decoder):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, _, multi_scale = decoder.forward_features(_features(1))
    assert mask_features.dtype == torch.float32
    assert all(x.dtype == torch.float32 for x in multi_scale)


def test_pixel_decoder_fp32_false_follows_autocast(decoder):
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_FP32 = False
    low = PIXEL_DECODER_REGISTRY.get("MSDeformAttnPixelDecoder")(cfg, _shapes()).eval()
    low.load_state_dict(decoder.state_dict())
    features = _features(2, seed=4)
    with torch.no_grad():
        reference = decoder.forward_features(features)
        assert low.forward_features(features)[0].dtype == torch.float32  # no autocast: float32 as before
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mask_features, _, multi_scale = low.forward_features(features)
    assert mask_features.dtype == torch.bfloat16
    assert all(x.dtype == torch.bfloat16 for x in multi_scale)
    # bf16 arithmetic, float32 sampling locations: close to the float32 decoder, not equal
    scale = reference[0].abs().max()
    diff = (mask_features.float() - reference[0]).abs().max()
    assert 0 < diff < 0.1 * scale


def test_head_exits_match_pixel_decoder_exits():
    torch.manual_seed(0)
    head = MaskFormerHead(_cfg(), _shapes()).eval()
    _randomise(head)
    feats = _features(3, seed=4)
    with torch.no_grad():
        multi = head.forward_multi_exit(feats, [2, NUM_LAYERS])
        per_image = head.forward_per_image_exit(feats, torch.tensor([2, NUM_LAYERS, 2]))
        for k in (2, NUM_LAYERS):
            fixed = head(feats, exit_layer=k)
            torch.testing.assert_close(multi[k]["pred_logits"], fixed["pred_logits"], atol=1e-5, rtol=0)
            torch.testing.assert_close(multi[k]["pred_masks"], fixed["pred_masks"], atol=1e-5, rtol=0)
            assert len(fixed["aux_outputs"]) == 2
        fixed2 = head(feats, exit_layer=2)
        full = head(feats)
    torch.testing.assert_close(per_image["pred_masks"][[0, 2]], fixed2["pred_masks"][[0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(per_image["pred_logits"][1], full["pred_logits"][1], atol=1e-5, rtol=0)
    assert full["pred_logits"].shape == (3, 6, 6)
    assert full["pred_masks"].shape == (3, 6, IMAGE_HW[0] // 4, IMAGE_HW[1] // 4)


def test_sine_position_encoding():
    pe = PositionEmbeddingSine(8, normalize=True)
    x = torch.zeros(2, 3, 4, 5)
    pos = pe(x)
    assert pos.shape == (2, 16, 4, 5)
    # first half encodes y (constant along x), second half x (constant along y)
    assert torch.all(pos[:, :8] == pos[:, :8, :, :1]) and torch.all(pos[:, 8:] == pos[:, 8:, :1, :])
    # normalised: the last row/column sits at 2*pi, so feature 0 (sin with frequency 1) is ~0 there
    assert pos[0, 0, -1].abs().max() < 1e-4 and pos[0, 8, :, -1].abs().max() < 1e-4
    y = torch.arange(1, 5, dtype=torch.float32) / (4 + 1e-6) * 2 * torch.pi
    torch.testing.assert_close(pos[0, 0, :, 0], y.sin())
    torch.testing.assert_close(pos[0, 1, :, 0], y.cos())
    torch.testing.assert_close(pos[0, 2, :, 0], (y / 10000 ** (2 / 8)).sin())
