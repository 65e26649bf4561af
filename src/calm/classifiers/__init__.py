"""Head classifiers on per-head features: SAV, CALM-global and CALM (METHOD.md; paper Eq. 1-13), and
the linear probe (:mod:`~calm.classifiers.probe`).

Modules: :mod:`~calm.classifiers.features` (input checks, labels, chunk sizes),
:mod:`~calm.classifiers.kernels` (in-place chunk math), :mod:`~calm.classifiers.base` (shared fit /
predict / state / files), :mod:`~calm.classifiers.sav` and :mod:`~calm.classifiers.calm`.

Both estimators follow scikit-learn conventions (``fit`` / ``predict`` / ``predict_proba`` /
``decision_function`` / ``score``, ``get_params`` / ``set_params`` / ``sklearn.base.clone``,
parameters checked by ``_parameter_constraints`` in ``fit``) on features X of shape
(n_samples, n_heads, head_dim), given as a NumPy array, a ``np.memmap``, a torch tensor (float16 /
bfloat16 / float32 / float64) or any array-like with ``shape``, ``dtype`` and row slicing. Labels y
may be any mutually comparable hashables (strings, ints, ...); ``classes_`` is their sorted set
unless ``classes=`` fixes the order. Predict paths never change the estimator.

Flattened input (the adapter for scikit-learn tools such as ``cross_val_score``): 2-D X of shape
(n_samples, n_heads * head_dim) is split into heads when the estimator is given ``n_heads=K``;
after ``fit`` every method also accepts (n, n_heads_ * head_dim_) input.

Tie rules (documented contract):

- ranking heads (SAV accuracy, CALM reliability): equal scores keep the lower head index; SAV with
  ``tie_break="margin"`` first orders heads of equal support accuracy by their mean clamped margin
  (Eq. 5-7 with ``tau_p``), then by the lower head index;
- a head's nearest centroid (Eq. 3), SAV vote ties (Eq. 4) and CALM score ties (Eq. 10): the lower
  class index, i.e. the earlier entry of ``classes_``.

Validation: ``fit`` rejects NaN or infinite values anywhere in X; ``predict`` and friends check
the heads they read (all heads CALM weights, SAV's kept heads), chunk by chunk.

Memory: queries (and support clips) are processed in chunks of ``chunk_size`` rows (None: chosen so
one chunk's working set is about 512 MiB; CALM reads chunks of about 128 MiB of stored features
without copying them and converts them block by block), so memory stays flat however many queries
are passed; every sum runs in float32, or float64 when the features are float64.

The math lives in :mod:`calm._heads` as small pure functions, re-exported here for analyses
(e.g. ``head_posteriors(cosine_similarities(X, clf.centroids_), clf.tau_p)`` gives the (n, K, C)
head posteriors of Eq. 5, with ``clf.tau_p_`` for a CALM fitted with ``scores="loo"``;
``head_weights(clf.reliability_, k, clf.tau_w)`` the weights another k would give without
refitting). Saving writes safetensors plus a JSON header, never pickle
(:mod:`calm.serialization`); :func:`load` reads it back.
"""

from __future__ import annotations

from calm._heads import (
    clamped_margins,
    class_centroids,
    class_reliability,
    cosine_similarities,
    global_reliability,
    head_posteriors,
    head_predictions,
    head_weights,
    rank_heads,
    resolve_k,
    top_k_mask,
    vote_counts,
    weighted_scores,
)
from calm.classifiers.base import HeadClassifier, load
from calm.classifiers.calm import CALM
from calm.classifiers.features import CHUNK_BYTES
from calm.classifiers.probe import LinearProbe
from calm.classifiers.sav import SAV

__all__ = [
    "SAV",
    "CALM",
    "LinearProbe",
    "HeadClassifier",
    "load",
    "CHUNK_BYTES",
    # the pure head math (calm._heads), re-exported for analyses
    "class_centroids",
    "cosine_similarities",
    "head_predictions",
    "head_posteriors",
    "clamped_margins",
    "global_reliability",
    "class_reliability",
    "resolve_k",
    "top_k_mask",
    "head_weights",
    "weighted_scores",
    "vote_counts",
    "rank_heads",
]
