import json
import subprocess
import sys

import pytest

from saeforge.cli import main
from saeforge.errors import SaeforgeError

COMMANDS = ("demo", "fetch", "sites", "cache", "train", "eval")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _leaf_commands():
    from saeforge.cli import COMMANDS, _command

    for name, (_, fn_ref, _) in COMMANDS.items():
        if fn_ref is None:
            yield from ([name, sub] for sub in _command(name)[0])
        else:
            yield [name]


@pytest.mark.parametrize("argv", list(_leaf_commands()), ids=" ".join)
def test_every_command_has_help_from_its_config_docstrings(argv, capsys):
    from saeforge.cli import _command

    out = _help(argv, capsys)
    cfg_cls = _command(argv[0])[0]
    cfg_cls = cfg_cls[argv[1]][0] if isinstance(cfg_cls, dict) else cfg_cls
    first_line = cfg_cls.__doc__.strip().splitlines()[0]
    assert out.count(first_line) == 1  # the description once, not again above the options
    assert "(default: )" not in out and "['cfg" not in out and " str str" not in out
    assert "(default: ()" not in out and "(default: None)" not in out


def test_help_names_positionals_and_option_groups(capsys):
    out = _help(["inspect"], capsys)
    assert "PATH TEXT" in " ".join(out.split())
    assert "model options:" in out and "device options:" in out
    assert "(default: auto)" in out
    out = _help(["cache"], capsys)
    assert "(default: layers.5.resid_post)" in " ".join(out.split())


def test_top_level_help_imports_no_command_module():
    code = ("import sys; from saeforge.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'saeforge.training', 'saeforge.features') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_cache_help_documents_the_fields(capsys):
    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--context-length" in help_text and "Leave BOS/EOS/padding positions out" in help_text


def test_user_errors_exit_2_with_problem_and_fix(tiny_llama_dir, text_file, tmp_path, capsys):
    code = main(["cache", "--model", str(tiny_llama_dir), "--sites", "layers.9.resid_post", "--corpus",
                 str(text_file), "--out", str(tmp_path / "c"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: site 'layers.9.resid_post': layer 9 does not exist" in err and "fix:" in err
    assert "Traceback" not in err


def test_sites_command_lists_sites(tiny_llama_dir):
    out = subprocess.run([sys.executable, "-m", "saeforge", "sites", "--model", str(tiny_llama_dir)],
                         capture_output=True, text=True, check=True).stdout
    assert "layers.2.mlp_out" in out and "d=32" in out and "model.layers.2.mlp" in out


@pytest.mark.embedded
def test_demo_runs_on_the_embedded_model(embedded_lm, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saeforge", "demo", "--cache-tokens", "3000", "--train-tokens",
                           "6144", "--batch-size", "512", "--expansion-factor", "2", "--eval-tokens", "1024",
                           "--harvest-tokens", "2048", "--explain-features", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "cached 3,000 tokens of layers.15.resid_post" in proc.stdout
    assert "trained a TopK SAE (d_sae 1152, k 32) on 6,144 tokens" in proc.stdout
    assert "evaluated on 1,024 held-out token positions" in proc.stdout and "CE rec." in proc.stdout
    report = json.loads((tmp_path / "run" / "eval.json").read_text())["saes"]["layers.15.resid_post"]
    assert report["ce_loss_clean"] < report["ce_loss_sae"] < report["ce_loss_zero_ablation"]
    assert "[5/7] harvested 2,048 held-out tokens" in proc.stdout and "[6/7] explained 1 features" in proc.stdout
    assert "[7/7] steering towards royalty" in proc.stdout and "refined CAA:" in proc.stdout
    assert "measured by the plain model on the generated text" in proc.stdout
    assert f"saeforge serve {tmp_path / 'run'}" in proc.stdout
    from saeforge.data.activation_cache import ActivationCache
    from saeforge.saes import load_sae

    cache = ActivationCache(tmp_path / "activations")
    assert cache.complete and cache.d("layers.15.resid_post") == 576
    sae = load_sae(tmp_path / "run" / "saes" / "layers.15.resid_post")
    x = cache.load("layers.15.resid_post")
    fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu < 0.9  # a dozen steps already explain part of the variance on raw activations


# ------------------------------------------------------------------------------------------------------------------
# Options given next to --config win over the file, and are compared on resume: every option, every spelling.

def _train_parser():
    import argparse

    from saeforge.cli import build_parser, option_fields

    parser = build_parser()
    parser.parse_args(["train"])  # simple_parsing adds the arguments of a command when it first parses it
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    return parser, option_fields(sub), [a for a in sub._actions if a.dest.startswith("cfg.")]


def _value_pairs(name, default):
    """(config file value, command line value) pairs: two different values (for a flag, both directions)."""
    if isinstance(default, bool):
        return [(False, True), (True, False)]
    if isinstance(default, int):
        return [(default + 1, default + 2)]
    if isinstance(default, float):
        return [(default + 0.25, default + 0.5)]
    if isinstance(default, tuple):
        return [(["file-" + name], ["cli-" + name])]
    return [(f"file-{name}", f"cli-{name}")]


def _spellings(option, value):
    """Every way to write ``option value`` on the command line (the value as the parser reads it)."""
    if isinstance(value, bool):
        if option.startswith("--no"):
            return [[option]] if value is False else []
        forms = [[option, str(value).lower()], [f"{option}={str(value).lower()}"]]
        return forms + ([[option]] if value else [])
    text = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    forms = [[option, *text]]
    if len(text) == 1:
        forms.append([f"{option}={text[0]}"])
        if not option.startswith("--"):
            forms.append([option + text[0]])  # -k16
    return forms


def _cases():
    from saeforge.options import flat_field_names
    from saeforge.training import TrainConfig

    _, _, actions = _train_parser()
    default = TrainConfig().to_dict()
    cases = []
    for action in actions:
        name = flat_field_names(TrainConfig)[action.dest.rsplit(".", 1)[-1]][1]
        if name in ("config", "resume"):
            continue
        for file_value, cli_value in _value_pairs(name, getattr(TrainConfig(), name)):
            for option in action.option_strings:
                for argv in _spellings(option, cli_value):
                    cases.append((name, file_value, cli_value, argv))
    assert {c[0] for c in cases} == set(default) - {"config", "resume", "saes"}  # every option is covered
    return cases


CASES = _cases()


@pytest.mark.parametrize("name, file_value, cli_value, argv", CASES, ids=[" ".join(c[3]) for c in CASES])
def test_an_option_next_to_config_wins_and_is_compared_on_resume(name, file_value, cli_value, argv, tmp_path):
    from saeforge.cli import given_fields
    from saeforge.training import TrainConfig
    from saeforge.training.config import RESUME_FREE_FIELDS, resolve_config
    from saeforge.training.run_dir import open_run

    parser, options, _ = _train_parser()
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({name: file_value}))
    full = ["train", "--config", str(config), *argv]
    given = given_fields(full, options)
    assert given == ["config", name]
    cfg = resolve_config(parser.parse_args(full).cfg, given)
    assert cfg.to_dict()[name] == cli_value, f"{' '.join(argv)} did not win over the file"

    if name == "out":
        return
    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig.from_dict({name: file_value}).to_dict()
    (run / "run.json").write_text(json.dumps({"format": "saeforge-run", "version": 1, "run_id": "x",
                                              "config": saved}))
    resume = ["train", "--resume", str(run), *argv]
    cfg = parser.parse_args(resume).cfg
    given = given_fields(resume, options)
    if name in RESUME_FREE_FIELDS:  # device, threads, progress: the resumed run takes the new value
        with open_run(cfg, given) as (resumed, _, _):
            assert resumed.to_dict()[name] == cli_value
    else:
        with pytest.raises(SaeforgeError) as err:
            with open_run(cfg, given):
                pass
        assert f"{name}: saved {file_value!r}, given {cli_value!r}" in str(err.value)


def test_train_command_passes_the_given_options(monkeypatch, tmp_path):
    import saeforge.training

    seen = {}
    monkeypatch.setattr(saeforge.training, "train", lambda cfg, given: seen.update(cfg=cfg, given=given) or {})
    config = tmp_path / "sweep.yaml"
    config.write_text("k: 8\ntokens: 1000\n")
    assert main(["train", "--config", str(config), "-k16", "--noprogress", "--tok", "5000"]) == 0
    assert seen["given"] == ["config", "k", "progress", "tokens"]  # --tok: the prefix argparse accepts
    assert (seen["cfg"].k, seen["cfg"].progress, seen["cfg"].tokens) == (16, False, 5000)
