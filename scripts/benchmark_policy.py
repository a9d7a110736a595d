#!/usr/bin/env python
"""Time the token-sharing policy network alone, the way a CTS / dCTS Segmenter runs it.

The policy is a small CNN (EfficientNet-Lite0 by default) on the whole image, whose FLOPs are a
few percent of the ViT's but whose time is not: its depthwise and 1 x 1 convolutions move far
more bytes than they compute. This times, on random images at each batch size:

* ``eager``: the frozen policy as trained (NCHW, separate BatchNorm kernels);
* ``folded``: BatchNorm folded into the convolutions, channels-last (``FastPolicy``'s copy), eager;
* ``graphed``: that copy replayed as one CUDA graph (what a Segmenter runs), and ``compiled``:
  compiled with inductor and then graphed (``MODEL.TOKEN_SHARING.COMPILE_POLICY``);

each with cuDNN's algorithm search off (PyTorch's default, ``torch.backends.cudnn.benchmark``
False) and on. Each variant's logits are compared with the float32 eager policy's first: its
error may be at most twice that of the eager policy in the same half precision (or 2%).
Example (one GPU, bf16)::

    python scripts/benchmark_policy.py --config-file configs/synthetic/dcts_vit_s_mask.yaml --size 1024 --batch 8 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eco_m2f.config import setup_cfg  # noqa: E402
from eco_m2f.evaluation.throughput import DTYPES, time_callable  # noqa: E402
from eco_m2f.modeling.meta_arch.token_sharing_policy import TokenSharingPolicy  # noqa: E402
from eco_m2f.modeling.policy.inference import FastPolicy  # noqa: E402
from eco_m2f.modeling.token_reduction.methods.sharing import policy_config  # noqa: E402


def _error(out, ref) -> float:
    """Largest difference of the logits from the float32 reference, over its largest value."""
    return max((out[s].float() - r).abs().max().item() / max(r.abs().max().item(), 1e-6) for s, r in ref.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default="configs/synthetic/dcts_vit_s_mask.yaml",
                        help="a token-sharing Segmenter config (its MODEL.TOKEN_SHARING.* build the policy)")
    parser.add_argument("--size", type=int, default=1024, help="square input side (pixels)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    parser.add_argument("--json", default="")
    parser.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    cfg = setup_cfg(args.config_file, ["MODEL.TOKEN_SHARING.POLICY_WEIGHTS", "", *args.opts])
    torch.manual_seed(0)
    device = torch.device("cuda")
    policy = TokenSharingPolicy(policy_config(cfg)).freeze().to(device)
    mean = torch.tensor(list(cfg.MODEL.PIXEL_MEAN), device=device)
    std = torch.tensor(list(cfg.MODEL.PIXEL_STD), device=device)
    dtype = DTYPES[args.dtype]
    rows = []
    print(f"{'variant':28s}{'cudnn search':>13s}" + "".join(f"{f'b{b} ms':>10s}{f'b{b} img/s':>12s}" for b in args.batch))
    variants = ["eager", "folded", "graphed"] + ([] if args.no_compile else ["compiled"])
    inputs = {}  # batch -> (images, float32 reference logits, allowed error): computed once
    for b in args.batch:
        x = torch.randn(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b)).to(device)
        with torch.inference_mode():
            ref = {s: t.float() for s, t in policy.window_logits(x, mean, std).items()}
            with torch.autocast("cuda", dtype=dtype):
                inputs[b] = (x, ref, max(2 * _error(policy.window_logits(x, mean, std), ref), 0.02))
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        for variant in variants:
            fast = FastPolicy(compile=variant == "compiled")
            row = {"variant": variant, "cudnn_benchmark": benchmark}
            for b in args.batch:
                x, ref, bound = inputs[b]
                with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                    if variant == "eager":
                        fn = lambda: policy.window_logits(x, mean, std)  # noqa: E731
                    elif variant == "folded":
                        copy = fast.get(policy, device)
                        xc = x.contiguous(memory_format=torch.channels_last)
                        fn = lambda: copy.window_logits(xc, mean, std)  # noqa: E731
                    else:
                        fn = lambda: fast.window_logits(policy, x, mean, std)  # noqa: E731
                    err = _error(fn(), ref)
                    if err > bound:
                        raise SystemExit(f"{variant}: logits {err:.4f} (relative) from the float32 policy's, more than {bound:.4f}")
                    ms = time_callable(fn, warmup=5, iters=args.iters, device=device)
                row[f"b{b}"] = {"ms": ms, "img/s": b / ms * 1e3, "error": err}
            rows.append(row)
            print(f"{variant:28s}{'on' if benchmark else 'off':>13s}"
                  + "".join(f"{row[f'b{b}']['ms']:10.2f}{row[f'b{b}']['img/s']:12.1f}" for b in args.batch), flush=True)
    torch.backends.cudnn.benchmark = False
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config_file, "size": args.size, "dtype": args.dtype,
                                               "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
