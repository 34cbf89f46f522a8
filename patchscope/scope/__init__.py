"""The Patchscope: find the placeholder, extract a source vector, inject it and generate."""
