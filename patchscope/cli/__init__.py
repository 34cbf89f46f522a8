"""The ``patchscope`` command. Subcommands import torch and transformers only when they run."""
