import numpy as np
import pytest
import torch

from calm.answering.pseudolabel import pseudo_label
from calm.answering.zeroshot import LALMSampler, as_chat_lm, verbalise, zero_shot
from calm.models.qwen2_5_omni import Qwen25OmniExtractor
from calm.models.qwen2_audio import Qwen2AudioExtractor
from calm.prompts import render_prompt
from tests.helpers.tiny_models import tiny_qwen2_audio
from tests.helpers.tiny_omni import tiny_qwen2_5_omni

CLASSES = ["dog", "rain", "car_horn"]


@pytest.fixture(scope="module", params=["qwen2-audio", "qwen2.5-omni"])
def extractor(request):
    if request.param == "qwen2-audio":
        model, processor = tiny_qwen2_audio(num_layers=2)
        return Qwen2AudioExtractor(model, processor, model_id="tiny")
    model, processor = tiny_qwen2_5_omni()
    return Qwen25OmniExtractor(model, processor, model_id="tiny")


@pytest.fixture(scope="module")
def waves():
    rng = np.random.default_rng(1)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in (8000, 12000, 5000)]


def _full_logits(ex, wave, prompt_text, extra_ids=()):
    """Slow reference: one clip, full forward without cache, logits at every position."""
    enc = dict(ex.build_inputs([wave], prompt_text))
    if extra_ids:
        extra = torch.tensor([list(extra_ids)])
        enc["input_ids"] = torch.cat([enc["input_ids"], extra], dim=1)
        enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(extra)], dim=1)
    with torch.inference_mode():
        return ex.model(**enc, use_cache=False).logits[0].float()


def test_letters_picks_largest_label_logit(extractor, waves):
    prompt = render_prompt("choices", CLASSES)
    result = zero_shot(extractor, waves, CLASSES, mode="letters", batch_size=2)
    assert result.prompt == prompt.text and result.n_unparsed == 0 and result.answers is None
    tok = extractor.processor.tokenizer
    label_ids = [tok.convert_tokens_to_ids(tok.tokenize(label))[0] for label in "ABC"]
    manual = np.stack([_full_logits(extractor, w, prompt.text)[-1, label_ids].numpy() for w in waves])
    np.testing.assert_allclose(result.scores, manual, atol=1e-4)
    assert result.predictions == [CLASSES[i] for i in manual.argmax(axis=1)]
    assert result.accuracy(result.predictions) == 1.0


def test_likelihood_equals_slow_per_class_recomputation(extractor, waves):
    prompt_text = "What sound is this?"
    result = zero_shot(extractor, waves, CLASSES, mode="likelihood", prompt=prompt_text, batch_size=2)
    tok = extractor.processor.tokenizer
    slow = np.zeros((len(waves), len(CLASSES)))
    for i, wave in enumerate(waves):
        for j, name in enumerate(CLASSES):
            ids = tok(verbalise(name), add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(_full_logits(extractor, wave, prompt_text, ids), dim=-1)
            start = logp.shape[0] - len(ids) - 1  # position predicting the first name token
            slow[i, j] = sum(logp[start + k, t].item() for k, t in enumerate(ids))
    np.testing.assert_allclose(result.scores, slow, atol=1e-3)
    assert result.predictions == [CLASSES[i] for i in slow.argmax(axis=1)]


def test_generate_counts_unparsed_and_is_deterministic_when_greedy(extractor, waves):
    a = zero_shot(extractor, waves, CLASSES, mode="generate", max_new_tokens=4, batch_size=2)
    b = zero_shot(extractor, waves, CLASSES, mode="generate", max_new_tokens=4, batch_size=3)
    assert a.answers == b.answers and len(a.answers) == len(waves)
    assert a.n_unparsed == sum(p is None for p in a.predictions)
    assert all(p is None or p in CLASSES for p in a.predictions)
    assert a.scores is None


def test_sampler_gives_m_answers_per_clip_and_plugs_into_pseudo_label(extractor, waves):
    sampler = LALMSampler(extractor, render_prompt("choices", CLASSES).text, max_new_tokens=3, seed=0)
    temps = np.array([[1.0, 2.0], [1.5, 2.5]])
    answers = sampler(waves[:2], temps)
    assert len(answers) == 2 and all(len(row) == 2 for row in answers)
    result = pseudo_label(sampler, waves, CLASSES, rollouts=3, option_labels="ABC", batch_size=2, seed=0)
    assert len(result.answers) == 3 and all(len(r) == 3 for r in result.answers)
    assert result.kept.sum() == sum(
        agree >= 0.5 and lab is not None for agree, lab in zip(result.agreement, result.labels, strict=True)
    )


def test_errors(extractor, waves):
    with pytest.raises(ValueError, match="mode"):
        zero_shot(extractor, waves, CLASSES, mode="vote")
    with pytest.raises(ValueError, match="options are the classes"):
        zero_shot(extractor, waves, CLASSES, mode="letters", prompt="Which?")
    with pytest.raises(TypeError, match="not an audio-language model"):
        as_chat_lm(object())
