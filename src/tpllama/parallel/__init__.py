"""Tensor parallelism: THE split plan (cut and load alike), the communicator (one rank is a
trivial one), shared-memory collectives, and starting the ranks (spawned or torchrun)."""
