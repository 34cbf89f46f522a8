"""Leaf helpers with no knowledge of models: atomic file writes, version stamps."""
