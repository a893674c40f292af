"""Fast sparse kernels for TopK-family SAEs (TopK, BatchTopK, Matryoshka, AuxK).

See :mod:`saeforge.kernels.sparse_topk` for the design and the exact semantics.
"""

from saeforge.kernels.sparse_topk import SparseLatents, decode_sparse, decode_sparse_blocks, encode_topk

__all__ = ["SparseLatents", "decode_sparse", "decode_sparse_blocks", "encode_topk"]
