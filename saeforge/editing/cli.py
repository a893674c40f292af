"""``saeforge edit ...``: ``apply`` (edit facts into a model, save it with its registry) and ``bench`` (the lifelong
editing benchmark against baselines)."""

from __future__ import annotations

from typing import Callable

from saeforge.editing.api import ApplyConfig, run_apply
from saeforge.editing.bench import BenchConfig, run_bench
from saeforge.flow.data import with_threads

EDIT_COMMANDS: dict[str, tuple[type, Callable, str]] = {
    "apply": (ApplyConfig, run_apply, "edit facts into a model through an SAE on one layer's MLP neurons and save "
              "it (a Hugging Face folder with its edit registry)"),
    "bench": (BenchConfig, with_threads(run_bench), "reliability, generalisation and locality after T sequential "
              "edits: SAE-localised edits against unmasked edits, a plain fine-tune and random masks"),
}
