"""The model answering: an audio-language model asked about a clip, its answers mapped to classes.

One module a job, from the model up: `chat_lm` (`ChatLM`: an LALM with its LM head, next-token
logits, generation, `LALMSampler`), `parse` (a free-text answer -> a class), `zeroshot` (the
zero-shot baseline: class scores / answers -> predictions), `pseudolabel` (pseudo-labels from
sampled answers: majority vote, agreement) and `clips` (zero-shot answers and pseudo-labels of
dataset clips, cached per clip). Nothing is imported here: import the module you need.
"""
