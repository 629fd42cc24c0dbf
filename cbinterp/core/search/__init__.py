"""The nearest-code search: the fused CPU kernel (C source shipped beside it) and the matmul search."""
