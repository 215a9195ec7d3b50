"""Task metrics, pure numpy. Scored positions come from `weights` (> 0), or, without weights, from
targets != IGNORE_INDEX (Zoology's label form). Logits are [..., V]; predictions are their argmax."""

from __future__ import annotations

import numpy as np

from memjax.tasks.base import ANSWER_PAD, IGNORE_INDEX


def _predictions(logits_or_predictions, targets) -> np.ndarray:
    x, targets = np.asarray(logits_or_predictions), np.asarray(targets)
    if x.ndim == targets.ndim + 1:
        return x.argmax(-1)
    if x.shape != targets.shape:
        raise ValueError(f"predictions {x.shape} do not match targets {targets.shape} (or logits [..., V])")
    return x


def _scored(targets, weights) -> np.ndarray:
    targets = np.asarray(targets)
    return targets != IGNORE_INDEX if weights is None else np.asarray(weights) > 0


def mqar_accuracy(logits_or_predictions, targets, weights=None) -> float:
    """Fraction of all scored positions (over the whole batch) whose prediction is the target."""
    predictions, scored = _predictions(logits_or_predictions, targets), _scored(targets, weights)
    if not scored.any():
        raise ValueError("mqar_accuracy: no scored positions")
    return float((predictions == np.asarray(targets))[scored].mean())


def teacher_forced_exact_match(logits_or_predictions, targets_BxT, weights_BxT=None) -> np.ndarray:
    """bool [B]: every scored position of the row is predicted right, which for an answer at the end
    of a prompt is exactly "greedy decoding from the prompt reproduces the answer"."""
    predictions, scored = _predictions(logits_or_predictions, targets_BxT), _scored(targets_BxT, weights_BxT)
    return np.all((predictions == np.asarray(targets_BxT)) | ~scored, axis=-1)


def exact_match_per_example(decoded_ids_BxN, answer_ids_BxA) -> np.ndarray:
    """bool [B]: the first A decoded tokens equal the answer (ANSWER_PAD entries of the answer are not
    compared; a decode shorter than the answer is wrong)."""
    decoded, answer = np.atleast_2d(np.asarray(decoded_ids_BxN)), np.atleast_2d(np.asarray(answer_ids_BxA))
    if decoded.shape[0] != answer.shape[0]:
        raise ValueError(f"decoded batch {decoded.shape[0]} != answer batch {answer.shape[0]}")
    width = answer.shape[1]
    if decoded.shape[1] < width:
        decoded = np.pad(decoded, ((0, 0), (0, width - decoded.shape[1])), constant_values=ANSWER_PAD - 1)
    compared = answer != ANSWER_PAD
    return np.all((decoded[:, :width] == answer) | ~compared, axis=-1)


def exact_match(decoded_ids_BxN, answer_ids_BxA) -> float:
    """Fraction of examples whose greedily decoded answer is exactly right (NIAH's score)."""
    return float(exact_match_per_example(decoded_ids_BxN, answer_ids_BxA).mean())


def sequence_logprob(logits_BxTxV, targets_BxT, weights_BxT) -> np.ndarray:
    """float [B]: sum over scored positions of log p(target); a candidate answer's log-likelihood."""
    logits = np.asarray(logits_BxTxV, np.float64)
    peak = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
    target_logit = np.take_along_axis(logits, np.asarray(targets_BxT)[..., None], axis=-1)[..., 0]
    return ((target_logit - log_z) * (np.asarray(weights_BxT) > 0)).sum(-1)


def label_set_accuracy(scores_BxK, label_index_B) -> float:
    """Fraction of examples whose best-scoring label (argmax over the task's label set) is the right one."""
    scores, label_index = np.asarray(scores_BxK), np.asarray(label_index_B).reshape(-1)
    if scores.ndim != 2 or scores.shape[0] != label_index.shape[0]:
        raise ValueError(f"scores {scores.shape} must be [B, K] with B = {label_index.shape[0]} labels")
    return float((scores.argmax(-1) == label_index).mean())
