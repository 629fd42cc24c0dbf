"""The nearest-code search: the fused CPU kernel (C source shipped beside it) and the matmul search."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
