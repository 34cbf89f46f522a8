"""The model layer: TransformerLens site names on HF modules, hooks installed as context managers, loading."""
