"""Decisions captured after the blocks (token_reduction/static_decision.py), run eagerly on CPU
on bucketed rows exactly as a CUDA graph runs them: the removal equals TokenSet.keep, and DoViT,
DToP and STEP with graph decisions equal themselves without them (a GPU test replays the real
graphs)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from token_reducers import LINEAR, SETR, images, tiny_segmenter  # noqa: E402
from eco_m2f.modeling.token_reduction import TokenSet  # noqa: E402
from eco_m2f.modeling.token_reduction.blocks import run_blocks  # noqa: E402
from eco_m2f.modeling.token_reduction.encoder_loop import ReductionLoop  # noqa: E402
from eco_m2f.modeling.token_reduction.packing import StaticLayout  # noqa: E402
from eco_m2f.modeling.token_reduction.static_decision import finish_keep, row_images, static_keep  # noqa: E402

ATM = ["MODEL.SEM_SEG_HEAD.NAME", "ATMHead", "MODEL.SEM_SEG_HEAD.ATM.HIDDEN_DIM", "16", "MODEL.SEM_SEG_HEAD.ATM.NUM_HEADS", "2",
       "MODEL.SEM_SEG_HEAD.ATM.NUM_LAYERS", "1", "MODEL.SEM_SEG_HEAD.ATM.DROPOUT", "0.0", "MODEL.VIT.OUT_INDICES", "[0, 2]"]
DTOP = ["MODEL.TOKEN_REDUCTION.NAME", "DTOP", "MODEL.TOKEN_REDUCTION.DTOP.PRUNE_LAYERS", "[1, 2]",
        "MODEL.TOKEN_REDUCTION.DTOP.THETA", "0.6", "MODEL.TOKEN_REDUCTION.DTOP.TOP_K_PER_CLASS", "1"]
STEP = ["MODEL.TOKEN_REDUCTION.NAME", "STEP", "MODEL.POLICY.WINDOW_SIZES", "[2, 4]", "MODEL.TOKEN_REDUCTION.DCTS.WINDOW_SIZES", "[2, 4]",
        "MODEL.TOKEN_REDUCTION.DCTS.SETTING", "", "MODEL.TOKEN_REDUCTION.DCTS.THRESHOLDS", "[0.5, 0.55]", *DTOP[2:]]
PAUMER = ["MODEL.TOKEN_REDUCTION.NAME", "PAUMER", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_LAYERS", "[1, 2]",
          "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.3, 0.5]"]
DOVIT = ["MODEL.TOKEN_REDUCTION.NAME", "DoViT", "MODEL.TOKEN_REDUCTION.DOVIT.DECISION_LAYERS", "[1, 2]",
         "MODEL.TOKEN_REDUCTION.DOVIT.AUX_HIDDEN", "8", "MODEL.TOKEN_REDUCTION.DOVIT.DISTILL_WEIGHT", "0.0"]


def _bucketed(tokens: TokenSet, bucket: int = 16, uniform: bool = False):
    """The set's rows in a graph's buffer: padded to a multiple of ``bucket`` (at least one padding
    row, the padding image of a ragged graph), or exact for a uniform graph."""
    layout = tokens.layout
    if uniform:
        return tokens.x.clone(), StaticLayout(layout.offsets(torch.int32).clone(), layout.max_len, True)
    rows = (layout.total // bucket + 1) * bucket
    x = torch.zeros(rows, tokens.x.shape[1], dtype=tokens.x.dtype)
    x[: layout.total] = tokens.x
    x[layout.total:] = 7.0  # padding holds anything finite
    offsets = torch.full((layout.batch_size + 2,), rows, dtype=torch.int32)
    offsets[: layout.batch_size + 1] = layout.offsets(torch.int32)
    return x, StaticLayout(offsets, max(layout.max_len, bucket))


def _ragged(seed: int = 0) -> TokenSet:
    """3 images of a 4 x 5 grid with 1 prefix token, holding 20, 13 and 7 live tokens."""
    g = torch.Generator().manual_seed(seed)
    ts = TokenSet.from_dense(torch.randn(3, 21, 6, generator=g), (4, 5))
    keep = torch.ones(60, dtype=torch.bool)
    keep[20:27] = False
    keep[40:53] = False
    return ts.keep(keep, save_features=True)


def _assert_same_set(a: TokenSet, b: TokenSet) -> None:
    assert a.layout.lengths == b.layout.lengths
    assert torch.equal(a.owner, b.owner)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=0, atol=0)  # live and finalised features in place


def test_row_images_mark_the_padding_rows():
    ts = _ragged()
    x, layout = _bucketed(ts)
    image = row_images(x.shape[0], layout, 3)
    expect = torch.cat([torch.full((n,), b) for b, n in enumerate(ts.layout.lengths)] + [torch.full((x.shape[0] - ts.layout.total,), 3)])
    assert torch.equal(image, expect)


@pytest.mark.parametrize("uniform", [False, True])
def test_static_keep_equals_token_set_keep(uniform):
    ts = TokenSet.from_dense(torch.randn(3, 21, 6), (4, 5)) if uniform else _ragged()
    g = torch.Generator().manual_seed(1)
    leave_patch = torch.rand(ts.layout.num_patches, generator=g) < 0.4
    expect = ts.keep(~leave_patch, save_features=True)
    x, layout = _bucketed(ts, uniform=uniform)
    leave = torch.zeros(x.shape[0], dtype=torch.bool)
    leave[ts.layout.patch_rows()] = leave_patch
    out = static_keep(x, layout, ts.owner, ts.num_prefix, leave)
    assert out["x"].shape == x.shape  # every size fixed by the input
    got = finish_keep(ts, out, save_features=True)
    _assert_same_set(got, expect)
    assert expect.live_counts != ts.live_counts


def test_static_keep_of_nothing_and_of_everything():
    ts = _ragged()
    x, layout = _bucketed(ts)
    patch = torch.zeros(x.shape[0], dtype=torch.bool)
    patch[ts.layout.patch_rows()] = True
    for leave in (torch.zeros_like(patch), patch):
        got = finish_keep(ts, static_keep(x, layout, ts.owner, 1, leave), save_features=True)
        _assert_same_set(got, ts.keep(~leave[ts.layout.patch_rows()], save_features=True))


class _EagerGraph:
    """Stands in for GraphedBlocks on CPU: the blocks eagerly, then the decision on the rows in a
    bucketed buffer (``uniform``: the exact rows of a uniform graph), as the captured graph
    computes it."""

    def __init__(self, blocks, calls, uniform=False):
        self.blocks, self.calls, self.uniform = list(blocks), calls, uniform

    def applies(self, tokens):
        return True

    def __call__(self, tokens):
        return run_blocks(self.blocks, tokens)

    def run_deciding(self, tokens, decision):
        after = run_blocks(self.blocks, tokens)
        x, layout = _bucketed(after, uniform=self.uniform and after.layout.uniform)
        self.calls.append(decision.key)
        return after, decision.compute(x, layout, {k: v.clone() for k, v in decision.inputs.items()})


@pytest.mark.parametrize("merge", [True, False])
def test_dovit_with_graph_decisions_equals_dovit(monkeypatch, merge):
    opts = [*DOVIT, "MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD", "0.5", "MODEL.TOKEN_REDUCTION.DOVIT.MERGE", str(merge)]
    model = tiny_segmenter(*opts, seed=3).eval()
    x = images((64, 64), (64, 64), (64, 64), seed=4)
    with torch.no_grad():
        heads = model.token_reducer.aux_heads  # confident heads: different numbers stop in each image
        for head in heads:
            head.cls.weight.mul_(100.0)
        _, eager = model.reduced_network(x)
        eager_records = model.cost_records(eager, (64, 64))
        loop = model._reduction
        calls = []
        monkeypatch.setattr(ReductionLoop, "_graphed", lambda self, start, stop, tokens: _EagerGraph(self.backbone.blocks[start:stop], calls))
        loop.cuda_graphs = loop.graph_decisions = True
        _, graphed = model.reduced_network(x)
        records = model.cost_records(graphed, (64, 64))
    assert [key[1] for key in calls] == [0, 1]  # both decisions went through the captured path
    stopped = [r["stopped"] for r in eager_records]
    assert len({tuple(s) for s in stopped}) > 1 and all(0 < sum(s) < 16 for s in stopped)
    assert [r["stopped"] for r in records] == stopped
    assert records == eager_records
    assert graphed.tokens.layout.lengths == eager.tokens.layout.lengths
    torch.testing.assert_close(graphed.features.tokens, eager.features.tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graphed.features.prefix, eager.features.prefix, rtol=1e-5, atol=1e-5)


def test_topk_rows_picks_each_images_best_rows_and_never_padding():
    from eco_m2f.modeling.token_reduction.methods.paumer import topk_rows

    ts = _ragged()  # 3 images holding 21, 14 and 8 rows (one prefix row each)
    x, layout = _bucketed(ts)
    image = row_images(x.shape[0], layout, 3)
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(x.shape[0], generator=g)
    scores[ts.layout.prefix_rows()] = float("-inf")
    scores[ts.layout.total:] = 5.0  # padding rows score highest and must still never be chosen
    keep = torch.tensor([4, 0, 7])
    got = topk_rows(scores, image, layout.offsets()[:4], layout.max_len, keep, 7)
    expect = torch.zeros(x.shape[0], dtype=torch.bool)
    for b, (start, n) in enumerate(zip(ts.layout.starts, ts.layout.lengths)):
        best = scores[start: start + n].topk(int(keep[b])).indices + start
        expect[best] = True
    assert torch.equal(got, expect) and int(got.sum()) == 11


class _NoWait:
    """Stands in for HostCopy where no count may come back from the device."""

    def __init__(self, *args):
        raise AssertionError("a decision waited for counts that the host knows")


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("opts", [[], ["MODEL.TOKEN_REDUCTION.PAUMER.EARLY_EXIT", "True"], SETR])
def test_paumer_with_graph_decisions_equals_paumer(monkeypatch, uniform, opts):
    """Top-k pausing captured after the blocks: the same tokens pause, the same features (or, with
    the early exit, logits) come back, the same records; the counts are known, so no wait."""
    model = tiny_segmenter(*PAUMER, *opts, seed=5).eval()
    x = images((64, 64), (64, 64), seed=6) if uniform else images((64, 64), seed=6)
    with torch.no_grad():
        eager_logits, eager = model.reduced_network(x, record_maps=True)
        eager_records = model.cost_records(eager, (64, 64))
        loop, calls = model._reduction, []
        monkeypatch.setattr(ReductionLoop, "_graphed",
                            lambda self, start, stop, tokens: _EagerGraph(self.backbone.blocks[start:stop], calls, uniform))
        monkeypatch.setattr("eco_m2f.modeling.token_reduction.static_decision.HostCopy", _NoWait)  # no count may be waited for
        loop.cuda_graphs = loop.graph_decisions = True
        logits, graphed = model.reduced_network(x, record_maps=True)
        records = model.cost_records(graphed, (64, 64))
    assert [key[1] for key in calls] == [0, 1]
    assert [r["paused"] for r in records] == [r["paused"] for r in eager_records] and all(sum(r["paused"]) for r in records)
    assert records == eager_records
    assert graphed.tokens.layout.lengths == eager.tokens.layout.lengths
    assert torch.equal(graphed.tokens.owner, eager.tokens.owner)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    for name, values in eager.state.token_maps.items():
        assert torch.equal(graphed.state.token_maps[name], values)


def test_paumer_offers_no_static_decision_in_training_or_where_nothing_pauses():
    from eco_m2f.modeling.token_reduction.plugin import ReductionState

    model = tiny_segmenter(*PAUMER, "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.0, 0.5]", seed=5)
    reducer, ts = model.token_reducer, _ragged()
    state = ReductionState(images=torch.zeros(3, 3, 64, 80), grid=(4, 5))
    assert reducer.static_decision(0, ts, state) is None  # tau 0: reduce() passes the tokens on
    assert reducer.static_decision(1, ts, state) is not None
    training = ReductionState(images=torch.zeros(3, 3, 64, 80), grid=(4, 5), targets=torch.zeros(3, 64, 80, dtype=torch.long))
    assert reducer.static_decision(1, ts, training) is None


def _eager_and_graphed(model, x, monkeypatch):
    """The pass with eager decisions, then with every decision on the captured path (the rows
    in a bucketed buffer, as a graph holds them); and the layers that took that path."""
    _, eager = model.reduced_network(x, record_maps=True)
    loop, calls = model._reduction, []
    monkeypatch.setattr(ReductionLoop, "_graphed", lambda self, start, stop, tokens: _EagerGraph(self.backbone.blocks[start:stop], calls))
    loop.cuda_graphs = loop.graph_decisions = True
    _, graphed = model.reduced_network(x, record_maps=True)
    monkeypatch.undo()
    loop.cuda_graphs = loop.graph_decisions = False
    return eager, graphed, [key[1] for key in calls]


@pytest.mark.parametrize("name,opts", [("DTOP", []), ("DTOP", LINEAR), ("DTOP", SETR), ("DTOP", ATM), ("STEP", [])])
def test_dtop_and_step_with_graph_decisions_equal_their_eager_decisions(monkeypatch, name, opts):
    """Images that prune different numbers of tokens (and, in STEP, share different windows),
    the top-k-per-class exception on: the same records, token maps, finalised values and scores."""
    model = tiny_segmenter(*(DTOP if name == "DTOP" else STEP), *opts, seed=1)
    with torch.no_grad():
        for head in model.token_reducer.heads.values():  # confident heads
            head[1].weight.mul_(20.0)
        x = torch.cat([images((64, 80), seed=s) for s in (3, 4, 5)])
        eager, graphed, layers = _eager_and_graphed(model, x, monkeypatch)
        want = model.head_outputs(model.sem_seg_head, eager.features, eager)
        got = model.head_outputs(model.sem_seg_head, graphed.features, graphed)
        records = model.cost_records(eager, (64, 80))
    assert layers == [0, 1]
    pruned = [r["pruned"] for r in records]
    assert len({tuple(p) for p in pruned}) > 1 and all(sum(p) for p in pruned)
    assert model.cost_records(graphed, (64, 80)) == records
    assert graphed.tokens.layout.lengths == eager.tokens.layout.lengths
    for key, value in eager.state.token_maps.items():
        assert torch.equal(graphed.state.token_maps[key], value), key
    for kind in eager.tokens.finals:
        torch.testing.assert_close(graphed.tokens.overlay_final(torch.zeros(3, 20, want_width(eager, kind)), kind),
                                   eager.tokens.overlay_final(torch.zeros(3, 20, want_width(eager, kind)), kind), rtol=1e-5, atol=1e-5)
    assert set(graphed.tokens.finals) == set(eager.tokens.finals)
    for key in ("pred_tokens", "pred_maps", "pred_masks", "final_scores"):
        if key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def want_width(done, kind: str) -> int:
    return done.tokens.finals[kind].chunks[0].shape[1]


def test_the_benchmark_scales_each_methods_classifiers_and_refuses_other_methods(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_graph_decisions.py"
    spec = importlib.util.spec_from_file_location("benchmark_graph_decisions", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dovit, dtop = tiny_segmenter(*DOVIT).token_reducer, tiny_segmenter(*DTOP).token_reducer
    assert bench._classifiers(dovit) == [h.cls for h in dovit.aux_heads]
    assert bench._classifiers(dtop) == [h[1] for h in dtop.heads.values()] and len(dtop.heads) == 2
    atm_aux = ["MODEL.TOKEN_REDUCTION.DTOP.AUX_HEAD", "atm", "MODEL.SEM_SEG_HEAD.ATM.NUM_LAYERS", "1"]
    with pytest.raises(SystemExit, match="linear auxiliary heads"):
        bench._classifiers(tiny_segmenter(*DTOP, *atm_aux).token_reducer)
    with pytest.raises(SystemExit):
        bench.main(["--config-file", str(path.parents[1] / "configs/synthetic/paumer_tiny_cpu.yaml")])
    assert "MODEL.TOKEN_REDUCTION.NAME is 'PAUMER'" in capsys.readouterr().err


def test_no_static_decision_in_training_or_at_xi_one():
    model = tiny_segmenter(*DOVIT, "MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD", "1.0", seed=3)
    reducer = model.token_reducer
    from eco_m2f.modeling.token_reduction.plugin import ReductionState

    ts = _ragged()
    assert reducer.static_decision(0, ts, ReductionState(images=torch.zeros(3, 3, 64, 80), grid=(4, 5))) is None
    reducer.threshold = 0.5
    state = ReductionState(images=torch.zeros(3, 3, 64, 80), grid=(4, 5), targets=torch.zeros(3, 64, 80, dtype=torch.long))
    assert reducer.static_decision(0, ts, state) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["DoViT", "DTOP", "STEP", "PAUMER", "PAUMER-b1"])
def test_captured_decisions_on_cuda_equal_the_eager_ones(name):
    """bf16 on CUDA: decisions captured in the blocks' graphs give the removals, tokens and
    logits of the eager decisions (the heads made confident, so that few confidences sit at the
    threshold, and PAUMER's entropies apart). PAUMER-b1: one image, in a bucketed graph."""
    if name == "DoViT":
        model, record = tiny_segmenter(*DOVIT, "MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD", "0.5", seed=3), "stopped"
        heads, size = [h.cls for h in model.token_reducer.aux_heads], (64, 64)
    elif name.startswith("PAUMER"):
        model, record = tiny_segmenter(*PAUMER, seed=5), "paused"
        heads, size = list(model.token_reducer.classifiers.values()), (64, 64)
    else:
        model, record = tiny_segmenter(*(DTOP if name == "DTOP" else STEP), seed=1), "pruned"
        heads, size = [h[1] for h in model.token_reducer.heads.values()], (64, 80)
    with torch.no_grad():
        for layer in heads:
            layer.weight.mul_(100.0 if name == "DoViT" else 20.0)
    model = model.cuda().eval()
    # the batches of the CPU tests above, where the removals differ between images
    if name == "PAUMER-b1":
        x = images(size, seed=6)
    elif name in ("DoViT", "PAUMER"):
        x = images(size, size, size, seed=4)
    else:
        x = torch.cat([images(size, seed=s) for s in (3, 4, 5)])
    x = x.cuda()
    results = []
    for graph_decisions in (False, True):
        model._reduction.graph_decisions = graph_decisions
        model._reduction.reset()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):  # capture, then replays
                logits, reduced = model.reduced_network(x)
            results.append((logits.float(), reduced.tokens.layout.lengths, model.cost_records(reduced, size)))
    (a, la, ra), (b, lb, rb) = results
    assert any(sum(r[record]) for r in ra)
    assert la == lb and [r[record] for r in ra] == [r[record] for r in rb]
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)


def _dovit_decision():
    """A tiny DoViT's first decision, the bucketed rows it is captured on, and its inputs."""
    from eco_m2f.modeling.token_reduction.plugin import ReductionState

    model = tiny_segmenter(*DOVIT, "MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD", "0.5", seed=3).eval()
    for head in model.token_reducer.aux_heads:
        head.cls.weight.data.mul_(100.0)
    x = images((64, 64), (64, 64), seed=4)
    state = ReductionState(images=x, grid=(4, 4))
    with torch.no_grad():
        tokens = model.token_reducer.embed(model.backbone, x, state)
        tokens = run_blocks(list(model.backbone.blocks[:2]), tokens)
    decision = model.token_reducer.static_decision(1, tokens, state)
    rows, layout = _bucketed(tokens)
    return model, decision, rows, layout


def test_compiled_decisions_equal_the_eager_ones_and_a_failing_compiler_falls_back(monkeypatch):
    from torch._dynamo.testing import CompileCounter

    from eco_m2f.modeling.token_reduction import graphs
    from eco_m2f.modeling.token_reduction.graphs import GraphedBlocks

    torch._dynamo.reset()
    model, decision, rows, layout = _dovit_decision()
    graphed = GraphedBlocks(list(model.backbone.blocks[:2]), compile=False, compile_decisions=True)
    counter = CompileCounter()
    monkeypatch.setattr(graphs, "_DECISION_BACKEND", counter)
    monkeypatch.setattr(graphs, "_DECISION_COMPILE_FAILURES", [])
    with torch.no_grad():
        want = decision.compute(rows, layout, dict(decision.inputs))
        got = graphed._decide(decision, rows, layout, dict(decision.inputs))
    assert counter.frame_count >= 1 and "compiled-decisions" in graphed.options.label()
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert 0 < int(want["kept"].sum()) < rows.shape[0]  # the decision removes some tokens

    def no_compiler(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")

    torch._dynamo.reset()
    monkeypatch.setattr(graphs, "_DECISION_BACKEND", no_compiler)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no compiler on this machine"):
        fallback = graphed._decide(decision, rows, layout, dict(decision.inputs))
    assert all(torch.equal(fallback[k], want[k]) for k in want)
    assert graphs._DECISION_COMPILE_FAILURES  # later decisions run uncompiled
    torch._dynamo.reset()


def test_finish_keep_queues_every_copy_before_it_waits(monkeypatch):
    """The copies of the graph's outputs are issued before the wait for the counts: after it, the
    host only slices (no kernel), so the next graph follows at once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from eco_m2f.modeling.token_reduction import static_decision

    ts = _ragged()
    x, layout = _bucketed(ts)
    leave = torch.zeros(x.shape[0], dtype=torch.bool)
    leave[ts.layout.patch_rows()[::3]] = True
    logits = torch.randn(x.shape[0], 4)
    out = static_keep(x, layout, ts.owner, ts.num_prefix, leave, {"logits": logits})
    computing, after_wait = [], []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            (after_wait if computing else []).append(str(func))
            return func(*args, **(kwargs or {}))

    class Wait(static_decision.HostCopy):
        def wait(self):
            computing.append(True)
            return super().wait()

    monkeypatch.setattr(static_decision, "HostCopy", Wait)
    with Ops():
        got = finish_keep(ts, out, save_features=True, save_logits=True)
    assert computing and got.live_counts != ts.live_counts
    kernels = [op for op in after_wait if not any(v in op for v in ("view", "slice", "alias", "detach"))]
    assert after_wait and kernels == [], kernels  # slices of the copies only


def test_captured_pause_steps_leave_few_operators_to_the_host(monkeypatch):
    """What a PAUMER pass still issues from Python outside the graphs (each a kernel launch on a
    GPU): with the pause steps captured, under half of what the eager pause steps issue."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_segmenter(*PAUMER, seed=5).eval()
    x = images((64, 64), (64, 64), seed=6)
    counted = [0]
    inside = [False]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counted[0] += not inside[0]
            return func(*args, **(kwargs or {}))

    class Quiet(_EagerGraph):  # what a graph replays is not the host's
        def __call__(self, tokens):
            inside[0] = True
            try:
                return super().__call__(tokens)
            finally:
                inside[0] = False

        def run_deciding(self, tokens, decision):
            inside[0] = True
            try:
                return super().run_deciding(tokens, decision)
            finally:
                inside[0] = False

    monkeypatch.setattr(ReductionLoop, "_graphed", lambda self, start, stop, tokens: Quiet(self.backbone.blocks[start:stop], []))
    head_forward = model.sem_seg_head.forward

    def graphed_head(*args, **kwargs):  # the decode head on the dense grid replays a graph too
        inside[0] = True
        try:
            return head_forward(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(model.sem_seg_head, "forward", graphed_head)
    loop, counts = model._reduction, {}
    with torch.no_grad():
        for captured in (False, True):
            loop.cuda_graphs, loop.graph_decisions = True, captured
            model.reduced_network(x)  # the layouts' index tensors are built once per pass either way
            counted[0] = 0
            with Count():
                model.reduced_network(x)
            counts[captured] = counted[0]
    assert counts[True] < counts[False] / 2, counts
