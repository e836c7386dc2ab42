"""Everything that measures: the seed's table, ``tpllama bench`` (transformers comparison, memory
roofline, synthetic models), ``tpllama quality``, the server load test, and micro-benchmarks of
the collectives and kernels."""
