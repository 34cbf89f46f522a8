"""The public API documents its arguments, results and an example; context managers say so."""

import pytest

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.profiling import profile
from patchscope.experiment import run_experiment
from patchscope.model.hooks import capture, patch, run_with_cache, stop_after
from patchscope.sae.loaders import load_sae
from patchscope.scope.extract import extract
from patchscope.scope.inject import inject


@pytest.mark.parametrize(
    "function", [capture, patch, stop_after, run_with_cache, profile, extract, inject, run_experiment, load_sae]
)
def test_public_functions_have_args_returns_and_an_example(function):
    doc = function.__doc__ or ""
    assert "Args:" in doc and "Example:" in doc and ">>>" in doc
    if function not in (stop_after,):
        assert "Returns:" in doc


@pytest.mark.parametrize("function", [capture, patch, stop_after])
def test_context_managers_say_they_are(function):
    assert function.__doc__.startswith("Context manager")


def test_atlas_class_is_documented():
    assert "Example:" in Atlas.__doc__ and "Attributes:" in Atlas.__doc__
