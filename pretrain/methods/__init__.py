"""Every method of the unified Siamese family, selectable by name (`method.name` in a config)."""

from .base import METHODS, Method, MethodConfig, build_method, method_config_class
from . import simsiam  # noqa: F401  (registers)
from . import moco, simclr  # noqa: F401  (registers mocov2, mocov3, simclr, simclr_abs, simclr_sq)
from . import barlow_twins, byol, unigrad, vicreg  # noqa: F401  (registers barlow_twins, byol, unigrad, vicreg, vicreg_exp, vicreg_ctr)

__all__ = ["METHODS", "Method", "MethodConfig", "build_method", "method_config_class"]
