import warnings

import pytest
from click.testing import CliRunner

from calm.cli import main
from calm.prompts import (
    DEFAULT_TEMPLATE,
    TEMPLATES,
    LabelLeakWarning,
    PromptTemplate,
    get_template,
    option_labels,
    render_prompt,
)

CLASSES = ["dog", "rain", "car_horn", "wind", "clock_tick"]


def test_default_is_label_free():
    template = get_template(DEFAULT_TEMPLATE)
    assert not template.leaks_labels
    assert render_prompt(DEFAULT_TEMPLATE).text == render_prompt(DEFAULT_TEMPLATE, CLASSES).text
    assert not any(c in render_prompt(DEFAULT_TEMPLATE).text for c in CLASSES)


def test_choices_lists_all_classes_in_given_order():
    prompt = render_prompt("choices", CLASSES)
    assert prompt.text == (
        "What caption does the given audio belong to? A. dog B. rain C. car_horn D. wind E. clock_tick"
    )
    assert prompt.options == tuple(CLASSES)
    assert prompt.labels == ("A", "B", "C", "D", "E")


def test_spoof_has_fixed_options_whatever_the_classes():
    prompt = render_prompt("spoof", CLASSES)
    assert prompt.text == "Is this audio bonafide or spoofed? A. bonafide B. spoofed"
    assert prompt.options == ("bonafide", "spoofed")


def test_paper_4way_contains_true_class_and_warns():
    for true in CLASSES:
        with pytest.warns(LabelLeakWarning):
            prompt = render_prompt("paper-4way", CLASSES, true_class=true, seed="clip.wav")
        assert true in prompt.options
        assert len(prompt.options) == len(set(prompt.options)) == 4
        assert set(prompt.options) <= set(CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelLeakWarning)
        a = render_prompt("paper-4way", CLASSES, true_class="dog", seed=1)
        b = render_prompt("paper-4way", CLASSES, true_class="dog", seed=1)
    assert a == b
    assert get_template("paper-4way").leaks_labels


def test_render_errors():
    with pytest.raises(ValueError, match="class names"):
        render_prompt("choices")
    with pytest.raises(ValueError, match="true class"):
        render_prompt("paper-4way", CLASSES)
    with pytest.raises(ValueError, match="not one of"):
        render_prompt("paper-4way", CLASSES, true_class="cat")
    with pytest.raises(ValueError, match="at least 4"):
        render_prompt("paper-4way", ["a", "b", "c"], true_class="a")
    with pytest.raises(ValueError, match="unique"):
        render_prompt("choices", ["a", "a"])
    with pytest.raises(KeyError, match="unknown prompt template"):
        get_template("nope")
    with pytest.raises(ValueError, match="fixed_options"):
        PromptTemplate(name="x", question="q", options="fixed", description="d")


def test_option_labels():
    labels = option_labels(30)
    assert labels[:3] == ("A", "B", "C")
    assert labels[25:28] == ("Z", "AA", "AB")
    assert len(set(option_labels(800))) == 800


def test_cli_prompts_shows_all_templates_and_warns():
    result = CliRunner().invoke(main, ["prompts", "--classes", "dog,rain,wind,car"])
    assert result.exit_code == 0, result.output
    for name in TEMPLATES:
        assert name in result.output
    assert "A. dog" in result.output
    assert "warning" in result.output
    only = CliRunner().invoke(main, ["prompts", "--template", "caption"])
    assert only.exit_code == 0
    assert "paper-4way" not in only.output and "warning" not in only.output
