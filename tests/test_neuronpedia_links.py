"""Neuronpedia links (patchscope/report/neuronpedia_links.py)."""

from patchscope.report.neuronpedia_links import feature_url, neuron_url


def test_raw_neurons_of_gemma_2_2b_link_to_their_layer_source():
    for model in ("gemma-2-2b", "google/gemma-2-2b"):
        assert neuron_url(model, "blocks.12.mlp.hook_post", 8526) == "https://www.neuronpedia.org/gemma-2-2b/12/8526"


def test_no_link_where_neuronpedia_has_no_page_we_know():
    assert neuron_url("gemma-2-2b", "blocks.12.mlp.hook_pre", 1) is None  # not the MLP's neurons
    assert neuron_url("gemma-2-2b", "blocks.12.hook_resid_post", 1) is None
    assert neuron_url("gemma-3-270m", "blocks.5.mlp.hook_post", 1) is None
    assert neuron_url("/some/local/model", "blocks.5.mlp.hook_post", 1) is None


def test_feature_links():
    assert (
        feature_url("gemma-3-270m/5-gemmascope-2-res-16k", 7)
        == "https://www.neuronpedia.org/gemma-3-270m/5-gemmascope-2-res-16k/7"
    )
    assert feature_url(None, 7) is None
