"""Rows of the prompt-and-answer tasks (NIAH, bAbI): a fixed answer slot at the end of every row.

A row is T + 1 tokens: [EOS] prompt body [answer slot]. The slot holds the answer's tokens then pad
(EOS) tokens up to `slot` (the longest answer the task can have), so the prompt length
`prompt_len = T + 1 - slot` is the same for every example of a task and every candidate answer:
  inputs = row[:T], targets = row[1:], weights = 1 on the answer's targets,
  answer_ids int32 [slot]  the answer's tokens, padded with ANSWER_PAD (-1)
  prompt_len int32 []      greedy decoding starts from inputs[:prompt_len]
Greedy decoding reproduces the answer exactly iff the argmax at every weighted position equals its
target, so exact match needs one teacher-forced forward pass (metrics.teacher_forced_exact_match).
"""

from __future__ import annotations

import numpy as np

from memjax.tasks.base import ANSWER_PAD


def padded(ids: np.ndarray, length: int) -> np.ndarray:
    out = np.full(length, ANSWER_PAD, np.int32)
    out[: len(ids)] = ids
    return out


def build_row(body_ids: np.ndarray, answer_ids: np.ndarray, *, seq_len: int, slot: int, eos_id: int) -> dict:
    prompt_len = seq_len + 1 - slot
    if 1 + len(body_ids) != prompt_len or len(answer_ids) > slot:
        raise AssertionError(f"row layout: body {len(body_ids)} + answer {len(answer_ids)} vs slot {slot}")
    row = np.full(seq_len + 1, eos_id, np.int32)
    row[1:prompt_len] = body_ids
    row[prompt_len : prompt_len + len(answer_ids)] = answer_ids
    weights = np.zeros(seq_len, np.float32)
    weights[prompt_len - 1 : prompt_len - 1 + len(answer_ids)] = 1.0
    return {
        "inputs": row[:-1],
        "targets": row[1:].copy(),
        "weights": weights,
        "prompt_len": np.int32(prompt_len),
        "answer_ids": padded(answer_ids, slot),
    }


def with_answer(batch: dict, answer_ids_BxS, pad_id: int) -> dict[str, np.ndarray]:
    """inputs/targets/weights of `batch` with each row's answer slot replaced by `answer_ids_BxS`.

    Used to score every label of a classification task: one forward pass per label, then
    metrics.sequence_logprob over the returned targets and weights.
    """
    inputs_BxT, prompt_len = np.asarray(batch["inputs"]), int(np.asarray(batch["prompt_len"]).reshape(-1)[0])
    if np.any(np.asarray(batch["prompt_len"]) != prompt_len):
        raise ValueError("with_answer needs one prompt_len for the whole batch (one task, one seq_len)")
    answer_ids_BxS = np.asarray(answer_ids_BxS)
    B, T = inputs_BxT.shape
    slot = T + 1 - prompt_len
    if answer_ids_BxS.shape != (B, slot):
        raise ValueError(f"answer_ids has shape {answer_ids_BxS.shape}, expected {(B, slot)}")
    real_BxS = answer_ids_BxS != ANSWER_PAD
    rows_BxR = np.concatenate([inputs_BxT[:, :prompt_len], np.where(real_BxS, answer_ids_BxS, pad_id)], axis=1)
    weights_BxT = np.zeros((B, T), np.float32)
    weights_BxT[:, prompt_len - 1 :] = real_BxS
    return {"inputs": rows_BxR[:, :-1].astype(np.int32), "targets": rows_BxR[:, 1:].astype(np.int32),
            "weights": weights_BxT}
