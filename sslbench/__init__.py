"""sslbench: pretrain and evaluate the unified Siamese SSL family under one protocol.

The core package (this one) holds what every stage shares: configuration, registries, datasets,
backbones, the backbone artifact, checkpoints, distributed helpers. It imports no stage package.
"""

__version__ = "0.1.0"
