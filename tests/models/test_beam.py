"""Greedy and beam search on hand-made step functions whose best answers are known."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.beam import beam_search, evaluating, greedy_search, search
from models.generation import GenerationPreset

PAD, SOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5
VOCAB = 6


def markov(table: dict[int, dict[int, float]]) -> tuple:
    """A step function whose next-token distribution depends on the last token only (unlisted tokens: ~0)."""
    probs = torch.full((VOCAB, VOCAB), 1e-9)
    for last, row in table.items():
        for token, p in row.items():
            probs[last, token] = p
    log_probs = (probs / probs.sum(-1, keepdim=True)).log()

    def step(tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return log_probs[tokens[:, -1]], state

    return step, log_probs


def preset(beams: int = 1, max_new: int = 10, min_new: int = 0, rep: float = 1.0, lp: float = 1.0) -> GenerationPreset:
    return GenerationPreset(
        "test", num_beams=beams, max_new_tokens=max_new, min_new_tokens=min_new, repetition_penalty=rep, length_penalty=lp
    )


def run(step, p: GenerationPreset, batch: int = 1, state: tuple[torch.Tensor, ...] | None = None) -> list[list[int]]:
    return search(step, state if state is not None else (torch.zeros(batch, 1),), batch, p, sos=SOS, eos=EOS, banned=(PAD, SOS))


# Greedy takes A (0.6) and then ends (A -> EOS 0.34): p = 0.204. B (0.4) -> EOS (0.99) is p = 0.396.
TRAP = {SOS: {A: 0.6, B: 0.4}, A: {EOS: 0.34, A: 0.33, B: 0.33}, B: {EOS: 0.99, A: 0.005, B: 0.005}}


def test_beam_finds_the_sequence_greedy_misses() -> None:
    step, _ = markov(TRAP)
    assert run(step, preset(beams=1)) == [[A]]
    assert run(step, preset(beams=2)) == [[B]]
    assert run(step, preset(beams=4)) == [[B]]


def test_min_new_tokens_masks_eos_until_reached() -> None:
    step, _ = markov(TRAP)
    # A -> (EOS masked) A or B tie at 0.33: the lower id, A; after three tokens EOS is allowed again.
    assert run(step, preset(beams=1, min_new=3)) == [[A, A, A]]
    for beams in (2, 3):
        (out,) = run(step, preset(beams=beams, min_new=3))
        assert len(out) >= 3
    assert run(step, preset(beams=1, min_new=2)) == [[A, A]]
    assert run(step, preset(beams=1, min_new=1)) == [[A]]  # one token was going to come anyway


def test_max_new_tokens_counts_the_eos() -> None:
    never_ends, _ = markov({SOS: {A: 1.0}, A: {A: 0.9, B: 0.1}, B: {A: 1.0}})
    for beams in (1, 3):
        assert run(never_ends, preset(beams=beams, max_new=4)) == [[A, A, A, A]]
    ends_at_once, _ = markov({SOS: {A: 1.0}, A: {EOS: 1.0}})
    assert run(ends_at_once, preset(beams=1, max_new=1)) == [[A]]  # cut before its EOS
    assert run(ends_at_once, preset(beams=2, max_new=2)) == [[A]]
    assert run(ends_at_once, preset(beams=2, max_new=0)) == [[]]


def test_repetition_penalty_as_transformers() -> None:
    # A is always likeliest (0.5 vs B 0.3, EOS 0.2). With penalty 2, log-probs of tokens already
    # present are doubled: after A, A scores 2 ln 0.5 = -1.39 < ln 0.3 = -1.20, so B; after A B,
    # A (-1.39) beats B (2 ln 0.3 = -2.41) and EOS (ln 0.2 = -1.61), and stays ahead.
    likes_a, _ = markov({last: {A: 0.5, B: 0.3, EOS: 0.2} for last in (SOS, A, B)})
    assert run(likes_a, preset(beams=1, max_new=5)) == [[A, A, A, A, A]]
    assert run(likes_a, preset(beams=1, max_new=5, rep=2.0)) == [[A, B, A, A, A]]
    # A penalty large enough makes every repeated token lose to EOS.
    assert run(likes_a, preset(beams=1, max_new=5, rep=10.0)) == [[A, B]]
    # Beam search scores whole hypotheses: [A] ends at (ln 0.5 + ln 0.2) / 2 = -1.15, [A, B] at
    # (ln 0.5 + ln 0.3 + ln 0.2) / 3 = -1.17.
    assert run(likes_a, preset(beams=3, max_new=5, rep=10.0)) == [[A]]


def test_length_penalty_divides_finished_scores_by_length_to_the_power() -> None:
    # [] (EOS at once): ln 0.55 = -0.60, length 1. [A]: ln(0.45 * 0.9) = -0.90, length 2 (with its EOS).
    step, _ = markov({SOS: {EOS: 0.55, A: 0.45}, A: {EOS: 0.9, A: 0.1}})
    assert run(step, preset(beams=2, lp=0.0)) == [[]]  # plain sums: -0.60 > -0.90
    assert run(step, preset(beams=2, lp=1.0)) == [[A]]  # -0.60 < -0.45
    assert run(step, preset(beams=2, lp=2.0)) == [[A]]


def test_ties_go_to_the_lower_id_and_runs_repeat() -> None:
    uniform, _ = markov({last: {A: 0.3, B: 0.3, C: 0.3, EOS: 0.1} for last in (SOS, A, B, C)})
    assert run(uniform, preset(beams=1, max_new=3)) == [[A, A, A]]
    first = run(uniform, preset(beams=3, max_new=6, lp=0.5))
    assert all(run(uniform, preset(beams=3, max_new=6, lp=0.5)) == first for _ in range(3))


def test_banned_tokens_are_never_generated() -> None:
    wants_pad, _ = markov({SOS: {PAD: 0.7, SOS: 0.2, A: 0.1}, A: {PAD: 0.7, SOS: 0.2, EOS: 0.1}})
    for beams in (1, 2):
        assert run(wants_pad, preset(beams=beams)) == [[A]]


def _history_step(weights: torch.Tensor):
    """Next-token log-probs that depend on the whole history, carried in the state (sum of token ids and length)."""

    def step(tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        (history,) = state
        history = history + torch.stack([tokens[:, -1].float(), torch.ones(tokens.shape[0])], dim=1)
        logits = torch.sin(history[:, :1] * weights[0] + history[:, 1:] * weights[1] + weights[2])
        logits[:, [PAD, SOS]] = -torch.inf
        return torch.log_softmax(3 * logits, dim=-1), (history,)

    return step


def _score(step, ids: list[int], max_new: int, lp: float) -> float:
    """Brute force: the score beam search gives a complete sequence (ids, then EOS unless cut at max_new)."""
    tokens, state, total = torch.tensor([[SOS]]), (torch.zeros(1, 2),), 0.0
    targets = ids + ([EOS] if len(ids) < max_new else [])
    for t in targets:
        log_probs, state = step(tokens, state)
        total += float(log_probs[0, t])
        tokens = torch.cat([tokens, torch.tensor([[t]])], dim=1)
    return total / len(targets) ** lp if targets else total


@pytest.mark.parametrize("lp", [0.0, 1.0, 1.5])
def test_wide_beam_is_exhaustive_and_reorders_the_state(lp: float) -> None:
    # Words A, B, C; at most 3 new tokens: 1 + 3 + 9 + 27 = 40 complete sequences. 64 beams never prune.
    torch.manual_seed(0)
    max_new = 3
    words = (A, B, C)
    for _ in range(3):
        step = _history_step(torch.randn(3, VOCAB))
        every = [list(s) for n in range(max_new + 1) for s in itertools.product(words, repeat=n)]
        best = max(every, key=lambda ids: _score(step, ids, max_new, lp))
        found = beam_search(
            step, (torch.zeros(1, 2),), 1, sos=SOS, eos=EOS, banned=(PAD, SOS), num_beams=64, max_new_tokens=max_new, length_penalty=lp
        )
        assert found == [best]


def test_a_batch_decodes_each_image_as_alone() -> None:
    torch.manual_seed(1)
    steps = [_history_step(torch.randn(3, VOCAB)) for _ in range(3)]

    def batched(tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        image, history = state
        rows = [steps[int(i)](tokens[r : r + 1], (history[r : r + 1],)) for r, i in enumerate(image.tolist())]
        return torch.cat([lp for lp, _ in rows]), (image, torch.cat([s[0] for _, s in rows]))

    for beams in (1, 3):
        p = preset(beams=beams, max_new=6, min_new=1, rep=1.3, lp=1.2)
        together = search(batched, (torch.arange(3), torch.zeros(3, 2)), 3, p, sos=SOS, eos=EOS, banned=(PAD, SOS))
        alone = [search(s, (torch.zeros(1, 2),), 1, p, sos=SOS, eos=EOS, banned=(PAD, SOS))[0] for s in steps]
        assert together == alone
        assert len({tuple(x) for x in together}) > 1  # the images really differ


def test_search_caps_max_new_tokens_and_checks_its_inputs() -> None:
    never_ends, _ = markov({SOS: {A: 1.0}, A: {A: 1.0}})
    assert run(never_ends, preset(beams=1, max_new=10)) == [[A] * 10]
    capped = search(never_ends, (torch.zeros(1, 1),), 1, preset(beams=2, max_new=10, min_new=8), sos=SOS, eos=EOS, max_new_tokens=3)
    assert capped == [[A] * 3]
    with pytest.raises(ValueError, match="state"):
        greedy_search(never_ends, (torch.zeros(2, 1),), 1, sos=SOS, eos=EOS, max_new_tokens=3)
    with pytest.raises(ValueError, match="batch_size"):
        greedy_search(never_ends, (), 0, sos=SOS, eos=EOS, max_new_tokens=3)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(never_ends, (torch.zeros(1, 1),), 1, sos=SOS, eos=EOS, num_beams=0, max_new_tokens=3)


def test_evaluating_restores_the_mode() -> None:
    module = torch.nn.Sequential(torch.nn.Dropout(0.5))
    module.train()
    with evaluating(module):
        assert not module.training and not module[0].training
    assert module.training and module[0].training
    module.eval()
    with evaluating(module):
        pass
    assert not module.training
