"""The storage layer: atomic file writes and checkpoints (safetensors + JSON, nothing pickled).

It sits below both decoding (which loads checkpoints) and training (which saves them), and knows
neither models nor vocabularies: it moves tensors and JSON documents.
"""
