"""Every method of the unified Siamese family, selectable by name (`method.name` in a config).

Importing a method's module registers it: simsiam, byol; moco (mocov2, mocov3); simclr (simclr,
simclr_abs, simclr_sq); barlow_twins; vicreg (vicreg, vicreg_exp, vicreg_ctr); unigrad.
"""

from . import barlow_twins, byol, moco, simclr, simsiam, unigrad, vicreg
from .base import METHODS, Method, MethodConfig, build_method, method_config_class

__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "barlow_twins",
    "build_method",
    "byol",
    "method_config_class",
    "moco",
    "simclr",
    "simsiam",
    "unigrad",
    "vicreg",
]
