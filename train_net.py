#!/usr/bin/env python
"""Train or evaluate any model of the registry (Detectron2's command line).

    python train_net.py --config-file F [--num-gpus N] [--num-machines M --machine-rank R --dist-url U]
                        [--resume] [--eval-only] [KEY VALUE ...]
"""
from eco_m2f.engine import default_argument_parser, main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    main(args)
