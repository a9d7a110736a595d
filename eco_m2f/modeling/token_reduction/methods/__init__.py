"""The built-in token-reduction methods; importing this package registers each of them in
:data:`~eco_m2f.modeling.token_reduction.plugin.TOKEN_REDUCTION_REGISTRY`."""
from .cts import CTS
from .dcts import DCTS
from .dovit import DoViT
from .dtop import DTOP
from .paumer import PAUMER
from .step import STEP

__all__ = ["CTS", "DCTS", "DTOP", "DoViT", "PAUMER", "STEP"]
