"""Scale-out on torch.distributed (``torchrun``): data- and module-parallel training, latent sharding of very wide
TopK SAEs (:mod:`saeforge.distributed.latent`), with checkpoints that do not depend on the number of ranks. ``saeforge train`` under torchrun uses it by itself; see docs/distributed.md.

Kept free of imports of the training package: the SAEs import :mod:`saeforge.distributed.batch`.
"""
