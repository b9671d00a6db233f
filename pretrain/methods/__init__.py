"""Every method of the unified Siamese family, selectable by name (`method.name` in a config)."""

from .base import METHODS, Method, MethodConfig, build_method, method_config_class
from . import simsiam  # noqa: F401  (registers)

__all__ = ["METHODS", "Method", "MethodConfig", "build_method", "method_config_class"]
