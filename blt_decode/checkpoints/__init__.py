"""Checkpoints: resolving a model name, the native, transformers and original formats."""
