"""The decoding layer: search (greedy, beam, sampling), translation, generation, loading a model."""
