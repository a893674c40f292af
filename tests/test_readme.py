"""The README's Python API section runs as written (on the tiny run, with its path and site put in)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SETTINGS = 'RUN, SITE = "run/", "layers.5.resid_post"'


def python_api_code() -> str:
    text = README.read_text()
    assert text.index("## Python API") < text.index("## Two commands")  # the first thing a reader meets
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_the_python_api_section_runs_as_written(tiny_run, capsys):
    code = python_api_code()
    assert code.count(SETTINGS) == 1
    code = code.replace(SETTINGS, f'RUN, SITE = {str(tiny_run)!r}, "layers.1.resid_post"')
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    lines = out.splitlines()
    top = namespace["inspector"].top_features("To be, or not to be", k=5)
    assert lines[0] == str(top) and 1 <= len(top) <= 5
    assert lines[1].endswith(" []")  # BOS, first under the run's token rules, is not SAE data
    latents = namespace["latents"]
    assert latents.shape[-1] == namespace["bound"].sae.cfg.d_sae and bool((latents[0] == 0).all())
    assert namespace["attribution"].shape == (namespace["bound"].sae.cfg.d_sae,)
    assert namespace["grad_e"].shape[-1] == namespace["bound"].write_site.d
    assert len(namespace["result"].steered) == 1
