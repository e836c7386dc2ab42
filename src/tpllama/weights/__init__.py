"""Weights and tokenizers: HF and GGUF readers, the stored form, cut parts and their manifest, the
default model, and atomic writes into the cache."""
