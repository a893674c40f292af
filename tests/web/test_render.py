"""How tokens and example windows are drawn: visible spaces, control tokens, broken bytes, a window's own peak."""

from __future__ import annotations

import re

import pytest

from saeforge.web.render import chip, control_name, example_html, share, show_token, token_html, window_peak


def test_chips_show_spaces_control_tokens_and_broken_bytes():
    html = str(chip(" lord"))
    assert html.count('class="ws"') == 1 and html.index("␣") < html.index(">lord<")
    assert str(chip("lord ")).count("␣") == 1 and str(chip("  ")).count("␣") == 2
    assert "␣" not in str(chip("lord")) and str(chip("")).endswith(">∅</span>")
    ctl = str(chip("<|im_start|>"))
    assert 'class="tok ctl"' in ctl and ">im_start<" in ctl and "&lt;|im_start|&gt;" in ctl  # the name; raw in title
    assert control_name("</s>") == "s" and control_name("[CLS]") == "CLS" and control_name("<b>") is None
    bad = str(chip(" \ufffd"))
    assert '<span class="bad" title="part of a multi-byte character' in bad and "␣" in bad
    assert str(chip("<script>")) == '<span class="tok" title="&#39;&lt;script&gt;&#39;">&lt;script&gt;</span>'
    assert str(chip(" king", "pos")).startswith('<span class="tok pos"')
    assert show_token("a\nb\tc\x00") == "a↵b⇥c␀"
    assert str(token_html("<|endoftext|>")).startswith('<span class="ctl"') and str(token_html(" the")) == " the"


@pytest.mark.parametrize("n, total, text", [(12, 4096, "12 (0.29 %)"), (0, 128, "0 (0.0 %)"),
                                            (64, 128, "64 (50.0 %)"), (3, 0, "3"), (1, 16384, "1 (0.0061 %)")])
def test_counts_with_their_share(n, total, text):
    assert share(n, total) == text


def test_a_quantile_window_marks_its_own_stronger_peak():
    e = {"tokens": ["a", " b", " c", " d"], "acts": [0.0, 1.0, 0.0, 6.0], "max_act": 1.0, "peak_offset": 1}
    html = str(example_html(e, 6.0))
    spans = re.findall(r'<span class="(t[^"]*)"', html)
    assert spans == ["t", "t on peak", "t", "t on wpeak"] and window_peak(e) == 6.0
    e["acts"] = [0.0, 1.0, 0.0, 1.1]  # not clearly stronger: only the sampled token is boxed
    assert "wpeak" not in str(example_html(e, 6.0)) and window_peak(e) is None
