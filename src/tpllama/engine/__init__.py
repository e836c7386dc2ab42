"""The engine: its one loop (``Engine.step``), the scheduler, sequences, sampling, and the model
runner every rank runs. ``load`` starts it."""
