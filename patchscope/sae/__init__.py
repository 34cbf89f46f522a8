"""JumpReLU SAEs (Gemma Scope): the module, pure loaders for each file layout, neuron attribution."""
