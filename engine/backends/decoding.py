"""Token search over the exported decoder, numpy only, with the rules of transformers' ``generate`` so that the
onnx backend writes the torch backend's texts: the repetition penalty, and beam search as
``GenerationMixin._beam_search`` runs it at its defaults (``early_stopping=False``, one EOS token; the length
penalty from the model config).

The decoder is any object with ``start(embeds, mask, adapter_mask) -> logits``, ``step(token_embeds) -> logits``,
``keep_rows(rows)`` (gather the cache rows, repeats allowed), ``steps_that_fit(max_new_tokens)``,
``can_drop_rows`` and ``max_batch`` (a fixed batch, or ``None``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: the score transformers gives a beam that must never be chosen
NEVER = -1.0e9


def penalise_repeats(scores: np.ndarray, generated: np.ndarray, penalty: float) -> None:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` in place: every token already generated in a row has
    its score divided by ``penalty`` (multiplied where negative)."""
    if penalty == 1.0 or generated.shape[1] == 0:
        return
    picked = np.take_along_axis(scores, generated, axis=1)
    np.put_along_axis(scores, generated, np.where(picked < 0, picked * penalty, picked / penalty), axis=1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's ``k`` highest scores, highest first (ties: lower index first)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -values), axis=1)
    return np.take_along_axis(part, order, axis=1)


def pad_rows(array: np.ndarray, batch: int) -> np.ndarray:
    """Repeat the last row up to ``batch`` rows (fixed-batch graphs; the extra rows are discarded)."""
    if array.shape[0] == batch:
        return array
    return np.concatenate([array, np.repeat(array[-1:], batch - array.shape[0], axis=0)])


def beam_search(decoder: Any, embed: Callable[[np.ndarray], np.ndarray], embeds: np.ndarray, mask: np.ndarray,
                selector: np.ndarray, *, max_new_tokens: int, num_beams: int, eos: int, pad: int,
                length_penalty: float = 1.0, repetition_penalty: float = 1.0) -> np.ndarray:
    """The best of ``num_beams`` beams for each of the ``B`` prompts (left-padded ``embeds`` (B, L, W),
    ``mask`` (B, L), adapter ``selector`` (B, E)); returns its ids (B, max_new_tokens), pad after EOS.

    A finished hypothesis scores its summed log-probabilities over ``length ** length_penalty``; a prompt's search
    ends when no running beam can beat its worst kept hypothesis (transformers' heuristic), and its beams then
    leave the cache where the decoder can drop rows."""
    items, beams, steps = embeds.shape[0], num_beams, max_new_tokens
    static = decoder.max_batch
    if static is not None and static < items * beams:
        raise ValueError(f"{items} prompts x {beams} beams do not fit the decoder's fixed batch of {static}")

    def fit(array: np.ndarray) -> np.ndarray:
        return pad_rows(array, static) if static else array

    expand = np.repeat(np.arange(items), beams)
    logits = decoder.start(fit(embeds[expand]), fit(mask[expand]), fit(selector[expand]))
    steps = decoder.steps_that_fit(steps)
    keep = 2 * beams  # transformers keeps (1 + number of EOS tokens) x beams candidates a step
    running = np.full((items, beams, steps), pad, np.int64)
    running_scores = np.zeros((items, beams), np.float32)
    running_scores[:, 1:] = NEVER  # the first step draws from one beam only
    finished = running.copy()
    finished_scores = np.full((items, beams), NEVER, np.float32)
    finished_flags = np.zeros((items, beams), bool)
    improvable = np.ones(items, bool)
    alive = np.arange(items)  # the prompts whose beams the cache holds, in order
    for cur in range(steps):
        n = len(alive)
        logp = log_softmax(logits[: n * beams].astype(np.float32))
        penalise_repeats(logp, running[alive].reshape(n * beams, steps)[:, :cur], repetition_penalty)
        vocab = logp.shape[1]
        scores = (logp.reshape(n, beams, vocab) + running_scores[alive][:, :, None]).reshape(n, beams * vocab)
        best = top_k(scores, keep)
        best_scores = np.take_along_axis(scores, best, axis=1)
        parents, tokens = best // vocab, best % vocab
        candidates = np.take_along_axis(running[alive], parents[:, :, None], axis=1)
        candidates[:, :, cur] = tokens
        ends = (tokens == eos) | (cur + 1 >= steps)

        # the best unfinished candidates run on
        going_scores = best_scores + ends * NEVER
        chosen = top_k(going_scores, beams)
        running[alive] = np.take_along_axis(candidates, chosen[:, :, None], axis=1)
        running_scores[alive] = np.take_along_axis(going_scores, chosen, axis=1)
        sources = np.take_along_axis(parents, chosen, axis=1)

        # a candidate among the first `beams` that ended joins the kept hypotheses if it beats one of them
        ended = ends.copy()
        ended[:, beams:] = False
        ended_scores = best_scores / ((cur + 1) ** length_penalty)
        ended_scores = ended_scores + (~improvable[alive])[:, None] * NEVER + (~ended) * NEVER
        merged_scores = np.concatenate([finished_scores[alive], ended_scores], axis=1)
        merged = top_k(merged_scores, beams)
        finished[alive] = np.take_along_axis(np.concatenate([finished[alive], candidates], axis=1),
                                             merged[:, :, None], axis=1)
        finished_scores[alive] = np.take_along_axis(merged_scores, merged, axis=1)
        finished_flags[alive] = np.take_along_axis(np.concatenate([finished_flags[alive], ended], axis=1),
                                                   merged, axis=1)
        if ends.all():
            break

        best_possible = running_scores[alive][:, :1] / ((cur + 1) ** length_penalty)
        worst_kept = np.where(finished_flags[alive], finished_scores[alive].min(axis=1, keepdims=True), NEVER)
        improvable[alive] &= (best_possible > worst_kept).any(axis=1)
        if not improvable.any():
            break
        stay = improvable[alive] if decoder.can_drop_rows else np.ones(n, bool)
        rows = (np.flatnonzero(stay)[:, None] * beams + sources[stay]).reshape(-1)
        if static:
            rows = np.concatenate([rows, np.arange(len(rows), static)])
        if not np.array_equal(rows, np.arange(static or n * beams)):
            decoder.keep_rows(rows)  # (a copy of the cache: skipped where every beam continues its own row)
        alive = alive[stay]
        next_tokens = running[alive][:, :, cur].reshape(-1)
        logits = decoder.step(fit(embed(next_tokens))[:, None, :])
    return finished[:, 0, :]
