"""Greedy and beam search for step-wise decoders (the CNN-LSTM's LSTM, the CLIP-Transformer's decoder).

A decoder is given as a step function ``step(tokens, state) -> (log_probs, state)``: ``tokens``
holds every token so far, ``<SOS>`` first, as an (N, t) tensor, one row per hypothesis; it returns
(N, V) log-probabilities of the next token and its new state. The state is a tuple of tensors
whose first dimension is the row (an LSTM's h and c, a transformer's image memory); the search
reorders it when beams are reordered.

The GenerationPreset means what it means to transformers' ``generate``:

* ``max_new_tokens`` counts the tokens after ``<SOS>``, the ``<EOS>`` included;
* ``min_new_tokens``: ``<EOS>`` cannot be chosen before that many tokens;
* ``repetition_penalty`` (CTRL, as transformers): scores of tokens already in the sequence are
  multiplied by it when negative, divided when positive. It is applied to log-probabilities, as
  transformers' beam search does, in greedy search too, so the two rank tokens alike;
* ``length_penalty``: a finished hypothesis scores ``sum of log-probs / length ** length_penalty``
  (its length counting the ``<EOS>``, so an immediate ``<EOS>`` divides by 1, not 0);
* a beam search is done with an image once it holds ``num_beams`` finished hypotheses and no
  running beam could still beat the worst of them (transformers' default ``early_stopping=False``
  heuristic), and stops when every image is done.

Ties go to the lower token id and the earlier beam, so a search is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from models.generation import GenerationPreset

State = tuple[torch.Tensor, ...]
StepFn = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, BatchNorm on running statistics) for a generation, then the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def search(
    step: StepFn,
    state: State,
    batch_size: int,
    preset: GenerationPreset,
    *,
    sos: int,
    eos: int,
    banned: Sequence[int] = (),
    max_new_tokens: int | None = None,
) -> list[list[int]]:
    """Generated ids per image, without ``<SOS>`` or ``<EOS>``: greedy when ``num_beams`` is 1, beam search otherwise.

    ``state`` has ``batch_size`` rows; ``banned`` ids (``<PAD>``, ``<SOS>``) are never generated;
    ``max_new_tokens`` caps the preset's (a decoder with a fixed number of positions).
    """
    limit = preset.max_new_tokens if max_new_tokens is None else min(preset.max_new_tokens, max_new_tokens)
    minimum = min(preset.min_new_tokens, limit)
    if preset.num_beams == 1:
        return greedy_search(
            step,
            state,
            batch_size,
            sos=sos,
            eos=eos,
            banned=banned,
            max_new_tokens=limit,
            min_new_tokens=minimum,
            repetition_penalty=preset.repetition_penalty,
        )
    return beam_search(
        step,
        state,
        batch_size,
        sos=sos,
        eos=eos,
        banned=banned,
        num_beams=preset.num_beams,
        max_new_tokens=limit,
        min_new_tokens=minimum,
        repetition_penalty=preset.repetition_penalty,
        length_penalty=preset.length_penalty,
    )


def _processed(
    log_probs: torch.Tensor,
    tokens: torch.Tensor,
    generated: int,
    *,
    eos: int,
    banned: Sequence[int],
    min_new_tokens: int,
    repetition_penalty: float,
) -> torch.Tensor:
    """Next-token scores after the bans, the minimum length and the repetition penalty."""
    scores = log_probs.float().clone()
    if repetition_penalty != 1.0:
        seen = scores.gather(1, tokens)
        scores.scatter_(1, tokens, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
    if banned:
        scores[:, list(banned)] = -torch.inf
    if generated < min_new_tokens:
        scores[:, eos] = -torch.inf
    return scores


def _check(batch_size: int, state: State, max_new_tokens: int, min_new_tokens: int, repetition_penalty: float) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    for tensor in state:
        if tensor.shape[0] != batch_size:
            raise ValueError(f"state: every tensor needs {batch_size} rows first, got shape {tuple(tensor.shape)}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens: must be between 0 and max_new_tokens ({max_new_tokens}), got {min_new_tokens}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty: must be positive, got {repetition_penalty}")


def _device(state: State) -> torch.device:
    return state[0].device if state else torch.device("cpu")


@torch.no_grad()
def greedy_search(
    step: StepFn,
    state: State,
    batch_size: int,
    *,
    sos: int,
    eos: int,
    banned: Sequence[int] = (),
    max_new_tokens: int,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
) -> list[list[int]]:
    _check(batch_size, state, max_new_tokens, min_new_tokens, repetition_penalty)
    tokens = torch.full((batch_size, 1), sos, dtype=torch.long, device=_device(state))
    finished = torch.zeros(batch_size, dtype=torch.bool, device=tokens.device)
    for generated in range(max_new_tokens):
        log_probs, state = step(tokens, state)
        scores = _processed(
            log_probs, tokens, generated, eos=eos, banned=banned, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty
        )
        # argmax keeps the first of equal maxima: the lower id.
        chosen = torch.where(finished, torch.full_like(finished, eos, dtype=torch.long), scores.argmax(dim=-1))
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        finished |= chosen == eos
        if bool(finished.all()):
            break
    return [_strip(row[1:].tolist(), eos) for row in tokens]


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


@dataclass
class _Hypotheses:
    """The best ``size`` finished hypotheses of one image: (score, ids), best first."""

    size: int
    length_penalty: float
    items: list[tuple[float, list[int]]] = field(default_factory=list)

    def add(self, sum_log_probs: float, ids: list[int], length: int) -> None:
        score = sum_log_probs / (max(length, 1) ** self.length_penalty)
        if len(self.items) < self.size or score > self.items[-1][0]:
            self.items.append((score, ids))
            # sorted() is stable: an equal later hypothesis ranks after the earlier one.
            self.items = sorted(self.items, key=lambda item: -item[0])[: self.size]

    def done(self, best_running_sum: float, length: int) -> bool:
        if len(self.items) < self.size:
            return False
        return self.items[-1][0] >= best_running_sum / (max(length, 1) ** self.length_penalty)


@torch.no_grad()
def beam_search(
    step: StepFn,
    state: State,
    batch_size: int,
    *,
    sos: int,
    eos: int,
    banned: Sequence[int] = (),
    num_beams: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    _check(batch_size, state, max_new_tokens, min_new_tokens, repetition_penalty)
    if num_beams < 1:
        raise ValueError(f"num_beams: must be at least 1, got {num_beams}")
    beams = num_beams
    device = _device(state)
    # Rows are image-major: row b * beams + k is beam k of image b.
    state = tuple(t.repeat_interleave(beams, dim=0) for t in state)
    tokens = torch.full((batch_size * beams, 1), sos, dtype=torch.long, device=device)
    # Only beam 0 is live at first, so the first step does not pick the same token num_beams times.
    sums = torch.full((batch_size, beams), -torch.inf, device=device)
    sums[:, 0] = 0.0
    hypotheses = [_Hypotheses(beams, length_penalty) for _ in range(batch_size)]
    done = [False] * batch_size
    for generated in range(max_new_tokens):
        log_probs, state = step(tokens, state)
        scores = _processed(
            log_probs, tokens, generated, eos=eos, banned=banned, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty
        )
        vocab = scores.shape[-1]
        candidates = (sums.reshape(-1, 1) + scores).reshape(batch_size, beams * vocab)
        # 2 * beams candidates leave enough non-<EOS> ones to refill every beam (as transformers).
        ranked, order = candidates.sort(dim=-1, descending=True, stable=True)
        top, index = ranked[:, : 2 * beams].tolist(), order[:, : 2 * beams].tolist()
        rows: list[int] = []
        next_ids: list[int] = []
        next_sums: list[float] = []
        for b in range(batch_size):
            picked: list[tuple[int, int, float]] = []
            if not done[b]:
                for rank, (score, flat) in enumerate(zip(top[b], index[b], strict=True)):
                    if score == -torch.inf:
                        break
                    beam, token = divmod(flat, vocab)
                    row = b * beams + beam
                    if token == eos:
                        # An <EOS> ranked below the beam width would not have survived as a beam.
                        if rank < beams:
                            hypotheses[b].add(score, tokens[row, 1:].tolist(), generated + 1)
                    else:
                        picked.append((row, token, score))
                    if len(picked) == beams:
                        break
                best_running = picked[0][2] if picked else -torch.inf
                done[b] = not picked or hypotheses[b].done(best_running, generated + 1)
            if done[b]:
                picked = []
            # Dead filler rows (score -inf) keep the row count fixed; they never yield a candidate.
            picked += [(b * beams, eos, -torch.inf)] * (beams - len(picked))
            for row, token, score in picked:
                rows.append(row)
                next_ids.append(token)
                next_sums.append(score)
        order = torch.tensor(rows, dtype=torch.long, device=device)
        tokens = torch.cat([tokens.index_select(0, order), torch.tensor(next_ids, dtype=torch.long, device=device)[:, None]], dim=1)
        state = tuple(t.index_select(0, order) for t in state)
        sums = torch.tensor(next_sums, device=device).reshape(batch_size, beams)
        if all(done):
            break
    for b in range(batch_size):
        if not done[b]:
            # Out of tokens: the running beams compete with the finished ones at their full length.
            for k in range(beams):
                if sums[b, k] > -torch.inf:
                    hypotheses[b].add(float(sums[b, k]), tokens[b * beams + k, 1:].tolist(), tokens.shape[1] - 1)
    return [_strip(h.items[0][1], eos) if h.items else [] for h in hypotheses]
