"""Hot per-batch reductions: plain-torch references, with optimised kernels beside them.

- `topk_merge`: the reference (the oracle every other kernel is tested against);
- `topk_merge_fast`: the eager torch kernels (block top-k, GEMV moments, exact tie fallback);
- `cpu_pass`: every statistic of a batch on the CPU in reused buffers, skipping blocks below the running
  k-th value (the profiler's CPU path; the other kernels serve other devices and inf/nan batches);
- `bottomk`, `histogram`, `quantiles`: the dashboard statistics, each with its plain reference;
- `fused`: the one-pass block maxima + moments, its backends and `batch_stats`, the profiler's entry point off the CPU;
- `triton_stats`: that pass as a Triton kernel (CUDA; tested under ``TRITON_INTERPRET=1``).
"""
