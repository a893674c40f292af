"""SAE-localised knowledge editing (a reconstruction of MicroEdit, Wang et al., EMNLP 2025; ``docs/editing.md``):
localise a fact to a few SAE latents on one layer's MLP neurons, change only those neurons' output weights, keep
a registry of the masks across lifelong edits, and measure reliability, generalisation and locality against
unmasked baselines.

    from saeforge.editing import Fact, edit_model
    lm, registry = edit_model("runs/l20", [Fact("The capital of France is", " Rome")], out="edited/")
"""

from saeforge.editing.api import ApplyConfig, edit_model, load_edit_sae, run_apply, save_edited
from saeforge.editing.bench import BenchConfig, EditBench, bench, run_bench
from saeforge.editing.edit import EDIT_METHODS, EditSettings, Editor
from saeforge.editing.facts import EncodedFact, Fact, KnownFact, builtin_facts, encode_answer, read_facts
from saeforge.editing.localize import Localization, localize
from saeforge.editing.registry import EditRecord, EditRegistry

__all__ = ["EDIT_METHODS", "ApplyConfig", "BenchConfig", "EditBench", "EditRecord", "EditRegistry", "EditSettings",
           "Editor", "EncodedFact", "Fact", "KnownFact", "Localization", "bench", "builtin_facts", "edit_model",
           "encode_answer", "load_edit_sae", "localize", "read_facts", "run_apply", "run_bench", "save_edited"]
