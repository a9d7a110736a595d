"""Configuration: ``get_cfg()`` returns every key the project knows, with its default."""
from __future__ import annotations

from .config_node import CfgNode, ConfigKeyError
from .deeplab import add_deeplab_config
from .defaults import add_base_config
from .dovit import add_dovit_config
from .dtop import add_dtop_config
from .eco import add_eco_config
from .engine import add_engine_config
from .mask_former import add_maskformer2_config
from .paumer import add_paumer_config
from .policy import add_policy_config
from .token_sharing import add_token_sharing_config
from .vit import add_vit_config
from .visualization import add_visualization_config

__all__ = ["CfgNode", "ConfigKeyError", "get_cfg", "setup_cfg"]


def get_cfg() -> CfgNode:
    """A fresh config holding Detectron2's, Mask2Former's and the project's keys.

    The order is Mask2Former's ``train_net.setup``: Detectron2's defaults, ``add_deeplab_config``,
    ``add_maskformer2_config``; then the project's keys.
    """
    cfg = CfgNode()
    add_base_config(cfg)
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_eco_config(cfg)
    add_engine_config(cfg)
    add_vit_config(cfg)
    add_paumer_config(cfg)
    add_dovit_config(cfg)
    add_dtop_config(cfg)
    add_policy_config(cfg)
    add_token_sharing_config(cfg)
    add_visualization_config(cfg)
    return cfg


def setup_cfg(config_file: str | None = None, opts: list[str] | None = None, freeze: bool = True) -> CfgNode:
    """get_cfg() + a YAML file (with ``_BASE_``) + ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    if freeze:
        cfg.freeze()
    return cfg
