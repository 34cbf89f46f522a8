"""Hot per-batch reductions: plain-torch references, with optimised kernels beside them.

- `topk_merge`: the reference (the oracle every other kernel is tested against);
- `topk_merge_fast`: the eager torch kernels (block top-k, GEMV moments, exact tie fallback);
- `fused`: the one-pass block maxima + moments, its backends and `batch_stats`, the profiler's entry point;
- `triton_stats`: that pass as a Triton kernel (CUDA; tested under ``TRITON_INTERPRET=1``).
"""
