"""Automatic interpretation of SAE features: an LLM explains each feature from its marked examples, and the
explanation is scored by detection (and optionally fuzzing) balanced accuracy. See docs/autointerp.md."""

from saeforge.features.autointerp.explain import ExplainConfig, explain, parse_features, run_explain

__all__ = ["ExplainConfig", "explain", "parse_features", "run_explain"]
