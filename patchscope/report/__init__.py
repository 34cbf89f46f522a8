"""Reports for people: the static neuron dashboard, the experiment's report.html, the Neuronpedia export."""
