"""The decode head replayed as a CUDA graph on the dense grid a reduced pass hands back
(MODEL.TOKEN_REDUCTION.GRAPH_HEAD): the eager head's outputs, fresh for every input."""
from __future__ import annotations

import sys
from pathlib import Path

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
