"""The data layer: corpora, vocabularies and token-based batches."""
