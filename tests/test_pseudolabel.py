import numpy as np
import pytest

from calm.answering.parse import match_answer, normalise
from calm.answering.pseudolabel import draw_temperatures, majority_vote, pseudo_label

CLASSES = ["dog", "rain", "car_horn", "wind"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("dog", "dog"),
        ("  Car horn. ", "car_horn"),
        ("CAR-HORN", "car_horn"),
        ("B", "rain"),
        ("B.", "rain"),
        ("(C)", "car_horn"),
        ("D) wind", "wind"),
        ("Answer: A", "dog"),
        ("The answer is b", "rain"),
        ("It sounds like a car horn honking", "car_horn"),
        ("rainn", "rain"),
        ("a dog barks", "dog"),
        ("E.", None),
        ("", None),
        ("a piano", None),
        ("dog or rain", None),
    ],
)
def test_match_answer_rules(answer, expected):
    assert match_answer(answer, CLASSES, ["A", "B", "C", "D"]) == expected


def test_match_answer_prefers_exact_then_label_and_needs_labels_for_letters():
    assert match_answer("B", CLASSES) is None  # no labelled options in the prompt
    assert match_answer("b", ["a", "b"], ["A", "B"]) == "b"  # exact name beats label
    assert match_answer("dog bark", ["dog", "dog_bark"]) == "dog_bark"
    assert normalise("Car_Horn!!  ") == "car horn"
    with pytest.raises(ValueError, match="option labels"):
        match_answer("A", CLASSES, ["A"])


def test_temperatures_seeded_and_in_range():
    t = draw_temperatures(50, 7, seed=3)
    assert t.shape == (50, 7) and t.min() >= 1.0 and t.max() < 2.5
    assert np.array_equal(t, draw_temperatures(50, 7, seed=3))
    assert not np.array_equal(t, draw_temperatures(50, 7, seed=4))


def test_majority_vote_counts_unparsed_in_denominator_and_breaks_ties_by_class_order():
    assert majority_vote(["rain", "dog", None, "dog"], CLASSES) == ("dog", 0.5)
    assert majority_vote(["rain", "dog"], CLASSES) == ("dog", 0.5)
    assert majority_vote([None, None], CLASSES) == (None, 0.0)


# Scripted generator: clip i answers SCRIPT[i] whatever the temperature (answers are free text).
SCRIPT = [
    ["dog", "dog", "dog", "rain"],  # 3/4 -> keep dog
    ["rain", "B", "wind", "dog"],  # 2/4 (rain, B=rain) -> keep rain (exactly 50 %)
    ["dog", "rain", "wind", "car horn"],  # 1/4 -> drop
    ["no idea", "???", "wind", "hmm"],  # 1/4 wind, 3 unparsed -> drop
    ["C", "C.", "car_horn", "honk"],  # 3/4 car_horn -> keep
    ["x", "y", "z", "w"],  # nothing parsed -> drop, label None
    ["wind", "wind", "dog", "dog"],  # tie 2/2: dog first in class order -> keep dog
]


class ScriptedSampler:
    def __init__(self):
        self.calls = []

    def __call__(self, inputs, temperatures):
        self.calls.append((list(inputs), temperatures.copy()))
        return [SCRIPT[i] for i in inputs]


def test_pseudo_label_keeps_exactly_clips_with_half_agreement():
    sampler = ScriptedSampler()
    result = pseudo_label(
        sampler, list(range(len(SCRIPT))), CLASSES, rollouts=4, option_labels="ABCD", batch_size=3, seed=1
    )
    assert result.labels == ["dog", "rain", "dog", "wind", "car_horn", None, "dog"]
    np.testing.assert_allclose(result.agreement, [0.75, 0.5, 0.25, 0.25, 0.75, 0.0, 0.5])
    assert result.kept.tolist() == [True, True, False, False, True, False, True]
    assert result.kept_per_class() == {"dog": 2, "rain": 1, "car_horn": 1, "wind": 0}
    assert result.n_unparsed == 3 + 4 + 1  # clip 3, clip 5, "honk"
    # batches of 3 clips, each with its own row of seeded temperatures
    assert [c[0] for c in sampler.calls] == [[0, 1, 2], [3, 4, 5], [6]]
    assert np.array_equal(np.concatenate([c[1] for c in sampler.calls]), result.temperatures)
    assert np.array_equal(result.temperatures, draw_temperatures(7, 4, seed=1))

    truth = ["dog", "wind", "dog", "wind", "car_horn;dog", "rain", "wind"]
    assert result.accuracy(truth) == pytest.approx(2 / 4)
    assert result.accuracy(truth, kept_only=False) == pytest.approx(4 / 7)
    report = result.report(truth)
    assert report["kept"] == 4 and report["clips"] == 7 and report["answers_unparsed"] == 8
    assert report["accuracy_kept"] == pytest.approx(0.5)


def test_pseudo_label_threshold_and_errors():
    strict = pseudo_label(
        ScriptedSampler(),
        list(range(len(SCRIPT))),
        CLASSES,
        rollouts=4,
        option_labels="ABCD",
        min_agreement=0.75,
    )
    assert strict.kept.tolist() == [True, False, False, False, True, False, False]
    with pytest.raises(ValueError, match="answers for each"):
        pseudo_label(ScriptedSampler(), [0], CLASSES, rollouts=3)
    with pytest.raises(ValueError, match="rollouts"):
        pseudo_label(ScriptedSampler(), [0], CLASSES, rollouts=0)
