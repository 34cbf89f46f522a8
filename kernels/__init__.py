"""Hot per-batch reductions: plain-torch references, with optimised kernels beside them.

- `topk_merge`: the reference (the oracle every other kernel is tested against);
- `topk_merge_fast`: the eager torch kernels (block top-k, GEMV moments, exact tie fallback);
- `cpu_pass`: every statistic of a batch on the CPU in reused buffers, skipping blocks below the running
  k-th value (the profiler's CPU path; the other kernels serve other devices and inf/nan batches);
- `bottomk`, `histogram`, `quantiles`: the dashboard statistics, each with its plain reference;
- `fused`: the one-pass block maxima + moments, its backends and `batch_stats`, the profiler's entry point off the CPU;
- `triton_stats`: that pass as a Triton kernel (CUDA; tested under ``TRITON_INTERPRET=1``).
"""

# This folder installs as `patchscope.kernels`. Run from the repository root (``python -m``, ``python -c``,
# ``torchrun``, a notebook), the root is on sys.path and ``import kernels`` finds this folder before
# HuggingFace's `kernels` package, which transformers >= 5.25 imports. Imported under that name, this
# module replaces itself with the package found on the rest of sys.path, or reports that there is none.
if __name__ != "patchscope.kernels":

    def _hand_over(name: str, here: str) -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.realpath(os.path.dirname(here))
        rest = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(name, rest)
        if spec is None or spec.loader is None or spec.origin == os.path.join(here, "__init__.py"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the import statement returns what sys.modules holds after this file runs
        spec.loader.exec_module(module)

    _hand_over(__name__, __path__[0])
