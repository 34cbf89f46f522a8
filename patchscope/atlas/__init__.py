"""The activation atlas: text sources, batching, the per-batch fold engine, the atlas, its files and exports."""
