"""dCTS: the quadtree resolution on constructed score maps (largest first, no overlap, every cell
once), an n x n window's embedding by hand, thresholds above 1 = the dense Segmenter exactly,
ragged batches equal to each image alone and to fvcore, named settings, clear errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_reducers import LINEAR, fvcore_gflops, images, tiny_segmenter  # noqa: E402
from eco_m2f.modeling.token_reduction.window_sharing import resolve_windows  # noqa: E402

SIZES = ["MODEL.POLICY.WINDOW_SIZES", "[2, 4, 8]", "MODEL.TOKEN_REDUCTION.DCTS.WINDOW_SIZES", "[2, 4, 8]",
         "MODEL.TOKEN_REDUCTION.DCTS.SETTING", ""]
DCTS = ["MODEL.TOKEN_REDUCTION.NAME", "DCTS", *SIZES]


def _thresholds(*values: float):
    return ["MODEL.TOKEN_REDUCTION.DCTS.THRESHOLDS", str(list(values))]


def _reference(wanted, h, w):
    """Largest first, one window at a time: the expected side of each cell's token."""
    side = [[1] * w for _ in range(h)]
    for n in sorted(wanted, reverse=True):
        m = wanted[n]
        for i in range(h // n):
            for j in range(w // n):
                cells = [(i * n + a, j * n + c) for a in range(n) for c in range(n)]
                if m[i][j] and all(side[r][c] == 1 for r, c in cells):
                    for r, c in cells:
                        side[r][c] = n
    return torch.tensor(side)


def test_quadtree_resolution_on_constructed_maps():
    h, w = 9, 12  # 4 x 4 windows: 2 x 3 of them; 8 x 8: 1 x 1; odd rows: the last is never shared
    g = torch.Generator().manual_seed(0)
    wanted = {n: torch.rand(3, h // n, w // n, generator=g) > 0.4 for n in (2, 4, 8)}
    wanted[8][1] = True  # image 1: the 8 x 8 window, then smaller ones around it
    wanted[4][2] = False
    wanted[8][2] = False
    wanted[2][2] = True  # image 2: only 2 x 2 windows, all of them
    result = resolve_windows(wanted, (h, w))
    for b in range(3):
        expected = _reference({n: m[b].tolist() for n, m in wanted.items()}, h, w)
        side = result.side[b].view(h, w)
        assert torch.equal(side, expected), b
        covered = torch.zeros(h, w, dtype=torch.long)
        taken = {n: 0 for n in (2, 4, 8)}
        for n in (8, 4, 2):  # every taken window is aligned and covers cells of its own side only
            for i in range(h // n):
                for j in range(w // n):
                    block = side[i * n:(i + 1) * n, j * n:(j + 1) * n]
                    top_left = side[i * n, j * n] == n and (i * n) % n == 0
                    if top_left and bool((block == n).all()):
                        covered[i * n:(i + 1) * n, j * n:(j + 1) * n] += 1
                        taken[n] += 1
        covered += (side == 1).long()
        assert torch.equal(covered, torch.ones(h, w, dtype=torch.long)), "every cell in exactly one token"
        assert result.taken[b].tolist() == [taken[2], taken[4], taken[8]]
        assert result.counts(result.taken.tolist())[b] == int((side == 1).sum()) + sum(taken.values())
    assert (result.side[1].view(h, w)[:8, :8] == 8).all()  # largest first wins
    assert (result.side[2].view(h, w)[8] == 1).all() and (result.side[2].view(h, w)[:8] == 2).all()


def _dcts(*opts: str, seed: int = 0):
    dense = tiny_segmenter(*opts, seed=seed)
    model = tiny_segmenter(*DCTS, *opts, seed=seed)
    report = model.load_state_dict(dense.state_dict(), strict=False)
    assert not report.unexpected_keys and all(k.startswith("token_reducer.policy.") for k in report.missing_keys)
    return dense, model


def test_thresholds_above_one_are_the_dense_segmenter_exactly():
    dense, model = _dcts(*_thresholds(1.5, 1.5, 2.0))

    def boom(*args, **kwargs):
        raise AssertionError("the policy ran although nothing can be shared")

    model.token_reducer.policy.window_logits = boom
    x = images((64, 128), (64, 128))
    with torch.no_grad():
        assert torch.equal(model.network(x), dense.network(x))
        _, reduced = model.reduced_network(x)
    assert model.cost_records(reduced, (64, 128))[0]["shared"] == [0, 0, 0]


def test_a_window_is_embedded_as_its_area_average_through_the_patch_embedding():
    _, model = _dcts(*_thresholds(0.0, 0.0, 2.0))  # the 4 x 4 window, then 2 x 2 ones beside it
    vit, reducer = model.backbone, model.token_reducer
    x = images((64, 96), seed=3)
    from eco_m2f.modeling.token_reduction.plugin import ReductionState

    with torch.no_grad():
        state = ReductionState(images=x, grid=(4, 6))
        tokens = reducer.embed(vit, x, state)
    assert tokens.live_counts == (3,) and state.cost[0]["shared"] == [2, 1, 0] and state.cost[0]["shared_cells"] == 24
    pos = vit.position_embedding((4, 6))[0, 1:]
    for i, j in [(0, 0)]:  # the one 4 x 4 window of a 4 x 6 grid
        region = x[:, :, 64 * i:64 * i + 64, 64 * j:64 * j + 64]
        small = F.avg_pool2d(region, 4)  # 64 x 64 pixels as one 16 x 16 patch
        by_hand = F.conv2d(small, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias).flatten(1)[0]
        cells = [(4 * i + a) * 6 + 4 * j + c for a in range(4) for c in range(4)]
        by_hand = vit.patch_embed.norm(by_hand) + pos[cells].mean(0)
        rows = tokens.owner[0, cells].unique()
        assert rows.numel() == 1
        assert torch.allclose(tokens.patches()[rows[0]], by_hand, atol=1e-5)
    # the two columns right of the 4 x 4 window: 2 x 2 windows would fit, but their threshold 0 takes them
    assert tokens.token_area().tolist().count(16) == 1 and tokens.token_area().tolist().count(4) == 2


@pytest.mark.parametrize("opts", [[], LINEAR])
def test_ragged_batches_equal_each_image_alone_and_fvcore(opts):
    _, model = _dcts(*opts, *_thresholds(0.5, 0.5, 0.5))
    r = model.token_reducer
    x = images((128, 128), (128, 128), (128, 128), seed=11)
    with torch.no_grad():
        logits = r.policy.window_logits(x, r.seg_pixel_mean, r.seg_pixel_std)
        scores = {n: v.float().softmax(1)[:, 1] for n, v in logits.items()}
    # thresholds between the images' scores, so that they share differently
    r.thresholds = tuple(float(scores[n].flatten(1).median(1).values.mean()) for n in (2, 4, 8))
    with torch.no_grad():
        batch_logits, reduced = model.reduced_network(x)
        records = model.cost_records(reduced, (128, 128))
    counts = list(reduced.tokens.live_counts)
    assert len(set(counts)) > 1 and all(0 < n < 64 for n in counts), counts
    for b, record in enumerate(records):
        with torch.no_grad():
            alone, alone_pass = model.reduced_network(x[b:b + 1])
        assert torch.allclose(batch_logits[b], alone[0], atol=1e-5)
        assert alone_pass.tokens.live_counts[0] == counts[b]
        n2, n4, n8 = record["shared"]
        assert counts[b] == 64 - 3 * n2 - 15 * n4 - 63 * n8 and record["tokens"] == [counts[b]] * 3
        assert record["shared_cells"] == 4 * n2 + 16 * n4 + 64 * n8
        assert record["gflops"] == pytest.approx(fvcore_gflops(model, x[b:b + 1]), rel=1e-9)
        # copied back: each token's per-cell outputs are equal over its cells
    with torch.no_grad():
        out = model.head_outputs(model.sem_seg_head, reduced.features, reduced)
    key = model.sem_seg_head.token_outputs[0]
    owner = reduced.tokens.owner
    for b in range(3):
        for row in owner[b].unique():
            cells = (owner[b] == row).nonzero().view(-1)
            assert torch.equal(out[key][b, cells], out[key][b, cells[:1]].expand(cells.numel(), -1))
    maps = model.token_maps(x)
    assert set(maps[0]["shared window"].values.unique().tolist()) <= {1, 2, 4, 8}


def test_named_settings():
    model = tiny_segmenter("MODEL.TOKEN_REDUCTION.NAME", "DCTS", "MODEL.POLICY.WINDOW_SIZES", "[2, 4, 8, 16]")
    assert model.token_reducer.thresholds == (0.6, 0.8, 0.9, 0.9) and model.token_reducer.window_sizes == (2, 4, 8, 16)
    model = tiny_segmenter("MODEL.TOKEN_REDUCTION.NAME", "DCTS", "MODEL.POLICY.WINDOW_SIZES", "[2, 4, 8, 16]",
                           "MODEL.TOKEN_REDUCTION.DCTS.SETTING", "tau-4999")
    assert model.token_reducer.thresholds == (0.4, 0.9, 0.9, 0.9)
    assert sorted(k for k in model.state_dict() if "window_predictors" in k and k.endswith("weight")) == [
        f"token_reducer.policy.window_predictors.{n}.weight" for n in ("16", "4", "8")]


@pytest.mark.parametrize("opts,match", [
    (["MODEL.TOKEN_REDUCTION.DCTS.SETTING", "tau-1234"], "DCTS.SETTING"),
    (["MODEL.TOKEN_REDUCTION.DCTS.SETTING", "tau-6899"], "DCTS.SETTING"),  # named settings are for 2, 4, 8, 16
    (["MODEL.TOKEN_REDUCTION.DCTS.THRESHOLDS", "[0.5, 0.5]"], "DCTS.THRESHOLDS"),
    (["MODEL.TOKEN_REDUCTION.DCTS.THRESHOLDS", "[0.5, -0.5, 0.5]"], "DCTS.THRESHOLDS"),
    (["MODEL.TOKEN_REDUCTION.DCTS.THRESHOLDS", "[0.5, 0.5, 0.5, 0.5]", "MODEL.TOKEN_REDUCTION.DCTS.WINDOW_SIZES",
      "[2, 4, 8, 16]"], "MODEL.POLICY.WINDOW_SIZES"),
    (["MODEL.TOKEN_REDUCTION.DCTS.WINDOW_SIZES", "[2, 3]"], "DCTS.WINDOW_SIZES"),
])
def test_bad_settings_fail_by_name(opts, match):
    with pytest.raises(ValueError, match=match):
        tiny_segmenter(*DCTS, *_thresholds(0.5, 0.5, 0.5), *opts)


CONFIGS = sorted(str(p.relative_to(Path(__file__).resolve().parents[1])) for pattern in (
    "configs/synthetic/*cts*.yaml", "configs/*/semantic-segmentation/cts/*.yaml",
    "configs/*/semantic-segmentation/dcts/*.yaml", "configs/*/semantic-segmentation/cts_policy/*.yaml")
    for p in Path(__file__).resolve().parents[1].glob(pattern))


@pytest.mark.parametrize("config", CONFIGS)
def test_token_sharing_configs_agree_with_their_policy_configs(config, monkeypatch):
    """Every CTS / dCTS config names a policy config whose structure it builds; the tiny ones build."""
    from eco_m2f.config import setup_cfg
    from eco_m2f.modeling.token_reduction.methods.sharing import WindowSharingReducer

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    cfg = setup_cfg(config)
    if cfg.MODEL.META_ARCHITECTURE == "TokenSharingPolicy":
        assert cfg.MODEL.POLICY.WINDOW_SIZES in ([2], [2, 4, 8], [2, 4, 8, 16])
        return
    assert cfg.MODEL.TOKEN_REDUCTION.NAME in ("CTS", "DCTS")
    policy = setup_cfg(cfg.MODEL.TOKEN_SHARING.POLICY_CONFIG)
    assert list(policy.MODEL.POLICY.WINDOW_SIZES) == list(cfg.MODEL.POLICY.WINDOW_SIZES)
    assert list(policy.MODEL.PIXEL_MEAN) == list(cfg.MODEL.TOKEN_SHARING.POLICY_PIXEL_MEAN)
    if "tiny_cpu" in config:
        from eco_m2f.architectures import build_model

        # build_model checks POLICY_CONFIG against the structure built (load_extra_weights)
        model = build_model(setup_cfg(config, ["MODEL.TOKEN_SHARING.POLICY_WEIGHTS", ""]))
        assert isinstance(model.token_reducer, WindowSharingReducer)
        assert set(model.token_reducer.window_sizes) <= set(model.token_reducer.policy.window_sizes)


def test_the_embedding_is_queued_before_the_wait_for_the_counts(monkeypatch):
    """With thresholds the counts of the windows taken come to the host once, and every
    embedding of fixed shape is issued before that wait: after it, only the gather."""
    from eco_m2f.modeling.token_reduction import window_sharing
    from eco_m2f.modeling.token_reduction.methods import sharing

    _, model = _dcts(*_thresholds(0.5, 0.5, 0.5))
    events = []

    class RecordingCopy(sharing.HostCopy):
        def wait(self):
            events.append("wait")
            return super().wait()

    prepare, embed = window_sharing.prepare_windows, window_sharing.embed_prepared
    monkeypatch.setattr(sharing, "HostCopy", RecordingCopy)
    monkeypatch.setattr(sharing, "prepare_windows", lambda *a: events.append("prepare") or prepare(*a))
    monkeypatch.setattr(sharing, "embed_prepared", lambda *a: events.append("gather") or embed(*a))
    with torch.no_grad():
        model.network(images((128, 128), (128, 128), seed=11))
    assert events == ["prepare", "wait", "gather"]
