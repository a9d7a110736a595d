#!/usr/bin/env python
"""Pictures of which tokens a token-reduction Segmenter removed, where (one PNG per image).

    python scripts/visualize_token_maps.py --config-file CONFIG --weights W [--num-images 8]
        [--output-dir DIR] [KEY VALUE ...]

The first --num-images images of DATASETS.TEST[0]: the input beside each of the model's token
maps over it (the blocks each token went through, e.g. "paused after layer 3", and the method's
own maps), with a legend counting the cells of each label. Writes DIR/token_maps_NNN.png
(default OUTPUT_DIR/token_maps).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--output-dir", default="")
    p.add_argument("--device", default=None)
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    args = p.parse_intermixed_args(argv)
    if not Path(args.weights).is_file():
        p.error(f"--weights file not found: {args.weights}")
    import torch

    from eco_m2f.checkpoint import load_weights
    from eco_m2f.config import setup_cfg
    from eco_m2f.data import build_detection_test_loader
    from eco_m2f.architectures import build_model
    from eco_m2f.visualization.token_maps import write_token_maps

    cfg = setup_cfg(args.config_file, args.opts)
    if not cfg.MODEL.TOKEN_REDUCTION.NAME:
        p.error("the config has no token-reduction method (MODEL.TOKEN_REDUCTION.NAME)")
    model = build_model(cfg)
    load_weights(model, args.weights)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    inputs = []
    for batch in build_detection_test_loader(cfg, cfg.DATASETS.TEST[0]):
        inputs += batch
        if len(inputs) >= args.num_images:
            break
    out = args.output_dir or os.path.join(cfg.OUTPUT_DIR, "token_maps")
    paths = write_token_maps(model, inputs[: args.num_images], out)
    print(f"wrote {len(paths)} pictures to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
