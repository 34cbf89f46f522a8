"""Hot per-batch reductions: plain-torch references, with optimised kernels beside them."""
