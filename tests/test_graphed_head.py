"""The decode head replayed as a CUDA graph on the dense grid a reduced pass hands back
(MODEL.TOKEN_REDUCTION.GRAPH_HEAD): the eager head's outputs, fresh for every input."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_reducers import images, tiny_segmenter  # noqa: E402
from eco_m2f.modeling.token_reduction.graphed_head import GraphedHead  # noqa: E402

PAUMER = ["MODEL.TOKEN_REDUCTION.NAME", "PAUMER", "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_LAYERS", "[1]",
          "MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS", "[0.5]"]
DOVIT = ["MODEL.TOKEN_REDUCTION.NAME", "DoViT", "MODEL.TOKEN_REDUCTION.DOVIT.DECISION_LAYERS", "[1, 2]",
         "MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD", "0.5"]
# fixed S: the same number of tokens in every image, handed to the head as live tokens
CTS = ["MODEL.TOKEN_REDUCTION.NAME", "CTS", "MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED", "2",
       "MODEL.TOKEN_REDUCTION.CTS.NUM_SHARED_OF", "0"]
# counts that follow the content: DToP prunes a different number of tokens in each image
DTOP = ["MODEL.TOKEN_REDUCTION.NAME", "DTOP", "MODEL.TOKEN_REDUCTION.DTOP.PRUNE_LAYERS", "[1, 2]",
        "MODEL.TOKEN_REDUCTION.DTOP.THETA", "0.6", "MODEL.TOKEN_REDUCTION.DTOP.TOP_K_PER_CLASS", "1"]


def _packed_rows(tokens, lengths, bucket=16):
    """Image b's first lengths[b] slots of tokens (B x N x C) packed, padded to a multiple of
    ``bucket`` (one padding row at least, holding finite junk), and the StaticLayout of a graph."""
    from eco_m2f.modeling.token_reduction.packing import StaticLayout

    rows = torch.cat([tokens[b, :n] for b, n in enumerate(lengths)])
    total = rows.shape[0]
    padded = torch.full(((total // bucket + 1) * bucket, tokens.shape[2]), 3.0)
    padded[:total] = rows
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist(), padded.shape[0]], dtype=torch.int32)
    return padded, StaticLayout(offsets, max(max(lengths), bucket))


@pytest.mark.parametrize("lengths", [[5, 3, 7], [6], [4, 4]])
def test_forward_rows_equals_the_packed_head_at_every_real_row(lengths):
    """The mask transformer on bucketed packed rows (the padding one more image), as a graph
    replays it, equals forward_packed (the masked padded head) at every real slot."""
    head = tiny_segmenter().sem_seg_head.eval()
    g = torch.Generator().manual_seed(7)
    tokens = torch.randn(len(lengths), 8, 32, generator=g)
    with torch.no_grad():
        want = head.forward_packed(tokens, lengths)["pred_tokens"]
        rows, layout = _packed_rows(tokens, lengths)
        got = head.forward_rows(rows, layout, len(lengths))
    assert got.shape == (rows.shape[0], head.num_classes)
    real = torch.cat([want[b, :n] for b, n in enumerate(lengths)])
    torch.testing.assert_close(got[: real.shape[0]], real, rtol=1e-5, atol=1e-5)
    # one image's rows are its own: changing another image's tokens leaves them alone
    if len(lengths) > 1:
        rows2 = rows.clone()
        rows2[: lengths[0]] += 1.0
        with torch.no_grad():
            other = head.forward_rows(rows2, layout, len(lengths))
        torch.testing.assert_close(other[lengths[0]: real.shape[0]], got[lengths[0]: real.shape[0]], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(other[: lengths[0]], got[: lengths[0]])


class _Replay:
    """Stands in for a captured CUDA graph on CPU: replay() reruns the captured function into the
    buffers it returned at capture."""

    def __init__(self, forward, outputs):
        self.forward, self.outputs = forward, outputs

    def replay(self):
        for name, t in self.forward().items():
            self.outputs[name].copy_(t)


def _stand_in_graphs(monkeypatch):
    from eco_m2f.modeling.token_reduction import graphed_head

    def capture(forward, device, pool, warmup=None):
        out = forward()
        return _Replay(forward, out), out

    monkeypatch.setattr(graphed_head, "warm_and_capture", capture)
    monkeypatch.setattr(graphed_head.torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(GraphedHead, "applies", staticmethod(lambda head, tokens: not head.training))


def test_the_head_of_content_dependent_counts_replays_a_graph_per_row_bucket(monkeypatch):
    """DToP hands the head a ragged batch: with graphs standing in on CPU, the packed graph path
    gives the eager head's logits, captures once per row bucket and reads each call's tokens."""
    eager = tiny_segmenter(*DTOP, "MODEL.TOKEN_REDUCTION.GRAPH_HEAD", "False", seed=1)
    model = tiny_segmenter(*DTOP, seed=1)
    with torch.no_grad():
        for m in (eager, model):  # confident heads: different numbers pruned in each image
            for head in m.token_reducer.heads.values():
                head[1].weight.mul_(20.0)
    x = torch.cat([images((64, 80), seed=s) for s in (3, 4, 5)])
    y = torch.cat([images((64, 80), seed=s) for s in (6, 7, 8)])
    _stand_in_graphs(monkeypatch)
    # on CPU the graph-shaped attention runs masked over all rows (the device kernels need CUDA)
    model._graphed_head.options = SimpleNamespace(attention="auto", row_bucket=16, len_bucket=16)
    with torch.no_grad():
        _, reduced = model.reduced_network(x)
        assert len(set(reduced.tokens.live_counts)) > 1  # a ragged batch reached the head
        got_x, got_y, again_x = model.network(x), model.network(y), model.network(x)
        want_x, want_y = eager.network(x), eager.network(y)
    graphed = model._graphed_head
    assert graphed.captures == len(graphed) >= 1
    assert all(key[0] == "packed" for key in graphed._graphs)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5)
    assert torch.equal(again_x, got_x)
    one = images((64, 80), seed=3)  # one image: uniform, yet its count follows the content
    with torch.no_grad():
        torch.testing.assert_close(model.network(one), eager.network(one), rtol=1e-5, atol=1e-5)
    assert any(key[2] == 1 for key in graphed._graphs)


def test_packed_graphs_refuse_bad_lengths_and_heads_without_forward_rows(monkeypatch):
    _stand_in_graphs(monkeypatch)
    graphed = GraphedHead()
    head = tiny_segmenter().sem_seg_head.eval()
    with pytest.raises(ValueError, match="do not fit"):
        graphed.packed(head, torch.randn(2, 8, 32), [9, 3])
    linear = tiny_segmenter("MODEL.SEM_SEG_HEAD.NAME", "SegmenterLinearHead").sem_seg_head.eval()
    assert not GraphedHead.applies_packed(linear, torch.randn(2, 8, 32))
    with pytest.raises(RuntimeError, match="forward_rows"):
        graphed.packed(linear, torch.randn(2, 8, 32), [3, 3])


def test_graph_head_is_built_only_with_the_runtime_graphs_and_runs_eagerly_off_cuda():
    model = tiny_segmenter(*PAUMER)
    assert isinstance(model._graphed_head, GraphedHead)
    assert tiny_segmenter(*PAUMER, "MODEL.TOKEN_REDUCTION.GRAPH_HEAD", "False")._graphed_head is None
    assert tiny_segmenter(*PAUMER, "MODEL.TOKEN_REDUCTION.CUDA_GRAPHS", "False")._graphed_head is None
    assert tiny_segmenter()._graphed_head is None  # the dense Segmenter keeps its eager head
    x = images((64, 64), (64, 64), seed=1)
    with torch.no_grad():
        eager = tiny_segmenter(*PAUMER, "MODEL.TOKEN_REDUCTION.GRAPH_HEAD", "False").network(x)
        assert torch.equal(model.network(x), eager)  # CPU: nothing to replay
    assert model._graphed_head.captures == 0 and len(model._graphed_head) == 0
    tokens = torch.randn(2, 16, 32)
    assert not GraphedHead.applies(model.sem_seg_head, tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("opts", [PAUMER, DOVIT, CTS], ids=["PAUMER", "DoViT", "CTS"])
def test_graphed_head_on_cuda_equals_the_eager_head(opts):
    """bf16 on CUDA: the logits of a pass with the head replayed equal those with the eager head,
    for a second input too (the replay reads its new tokens, the outputs are copies)."""
    eager = tiny_segmenter(*opts, "MODEL.TOKEN_REDUCTION.GRAPH_HEAD", "False", seed=2).cuda().eval()
    graphed = tiny_segmenter(*opts, seed=2).cuda().eval()
    graphed.load_state_dict(eager.state_dict())
    first, second = images((64, 64), (64, 64), seed=3).cuda(), images((64, 64), (64, 64), seed=4).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out_first = graphed.network(first)
        kept = out_first.clone()
        out_second = graphed.network(second)
        again = graphed.network(second)
        want_first, want_second = eager.network(first), eager.network(second)
    assert graphed._graphed_head.captures == 1 and len(graphed._graphed_head) == 1
    torch.testing.assert_close(out_first.float(), want_first.float(), rtol=0.02, atol=0.02)
    torch.testing.assert_close(out_second.float(), want_second.float(), rtol=0.02, atol=0.02)
    assert torch.equal(again, out_second) and torch.equal(out_first, kept)  # replays leave earlier outputs alone
    assert not torch.allclose(out_first.float(), out_second.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_graphed_head_on_cuda_equals_the_eager_head():
    """bf16 on CUDA: DToP's ragged batches (and one image) through the packed head graphs give
    the eager head's logits; a second batch of the same bucket replays without a capture."""
    eager = tiny_segmenter(*DTOP, "MODEL.TOKEN_REDUCTION.GRAPH_HEAD", "False", seed=1)
    with torch.no_grad():
        for head in eager.token_reducer.heads.values():
            head[1].weight.mul_(20.0)
    graphed = tiny_segmenter(*DTOP, seed=1)
    graphed.load_state_dict(eager.state_dict())
    eager, graphed = eager.cuda().eval(), graphed.cuda().eval()
    batches = [torch.cat([images((64, 80), seed=s) for s in seeds]).cuda() for seeds in ((3, 4, 5), (6, 7, 8))]
    batches.append(images((64, 80), seed=3).cuda())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for x in batches:
            got, want = graphed.network(x), eager.network(x)
            torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    assert graphed._graphed_head.captures >= 2 and all(key[0] == "packed" for key in graphed._graphed_head._graphs)
