"""Acting through features: steering, clamping and ablation during generation, and steering vectors."""
