"""Model diffing: a second model (a brief fine-tune of the first, :mod:`saeforge.diffing.finetune`), a crosscoder
over both models' activations, and the analysis of its decoder norms (shared and exclusive features)."""
