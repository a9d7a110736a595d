"""The ideal token schedule (eco_m2f.evaluation.ideal_schedule): with every token it is the dense
Segmenter; with fewer, each block sees its count, the tokens left behind keep their last
features; the schedule is the records' mean per block; bad schedules fail loudly."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_reducers import SETR, images, tiny_segmenter  # noqa: E402
from eco_m2f.evaluation.ideal_schedule import ideal_network, schedule_from_records  # noqa: E402

PAUMER = ["MODEL.TOKEN_REDUCTION.NAME", "PAUMER", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_LAYERS", "[1, 2]",
          "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.5]"]


@pytest.mark.parametrize("opts", [[], SETR])
def test_every_token_is_the_dense_segmenter(opts):
    model = tiny_segmenter(*opts)
    x = images((64, 64), (64, 64), seed=3)
    with torch.no_grad():
        ideal = ideal_network(model, [16, 16, 16])(x)
        assert torch.equal(ideal, model.network(x))


def test_each_block_sees_its_count_and_the_rest_keep_their_last_features():
    model = tiny_segmenter(*PAUMER)
    seen, outputs, normed = [], [], []

    def block_hook(module, args, out) -> None:
        seen.append(args[0].shape[1])
        outputs.append(out)

    hooks = [b.register_forward_hook(block_hook) for b in model.backbone.blocks]
    hooks.append(model.backbone.norm.register_forward_hook(lambda m, a, o: normed.append(a[0]) and None))
    x = images((64, 64), (64, 64), seed=4)
    with torch.no_grad():
        logits = ideal_network(model, [16, 9, 4])(x)
    for h in hooks:
        h.remove()
    assert logits.shape == (2, model.sem_seg_head.num_classes, 64, 64)
    assert seen == [17, 10, 5]  # the class token and each block's count
    final = normed[-1]  # the final norm's input: every token back, in order
    assert final.shape == (2, 17, 32)
    assert torch.equal(final[:, :5], outputs[2])
    assert torch.equal(final[:, 5:10], outputs[1][:, 5:])  # left after block 1
    assert torch.equal(final[:, 10:], outputs[0][:, 10:])  # left after block 0


def test_the_schedule_is_the_mean_per_block_and_fits_a_reduced_pass():
    records = [{"tokens": [16, 9, 4]}, {"tokens": [16, 8, 5]}]
    assert schedule_from_records(records) == [16, 8, 4]  # 8.5 and 4.5 round to even
    model = tiny_segmenter(*PAUMER)
    x = images((64, 64), (64, 64), seed=5)
    with torch.no_grad():
        _, reduced = model.reduced_network(x)
        counts = schedule_from_records(model.cost_records(reduced, x.shape[-2:]))
        assert counts == [16, 8, 4]  # 16 - int(0.5 * 16), then 8 - int(0.5 * 8)
        assert ideal_network(model, counts)(x).shape == model.network(x).shape


def test_bad_schedules_fail_loudly():
    model = tiny_segmenter()
    with pytest.raises(ValueError, match="3 blocks"):
        ideal_network(model, [16, 16])
    with pytest.raises(ValueError, match="never grow"):
        ideal_network(model, [8, 16, 16])
    with pytest.raises(ValueError, match="16 patches"):
        ideal_network(model, [20, 20, 20])(images((64, 64)))
    with pytest.raises(ValueError, match="'tokens'"):
        schedule_from_records([{"gflops": 1.0}])
    with pytest.raises(ValueError, match="different lengths"):
        schedule_from_records([{"tokens": [1, 2]}, {"tokens": [1]}])
