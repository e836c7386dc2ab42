"""The transformer in plain PyTorch (it knows nothing of ranks: ``reduce`` is passed in), its KV
cache, quantized linear layers and the fused C++ decode blocks."""
