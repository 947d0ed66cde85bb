"""A stand-in for a language model's pretraining, for the tiny from-scratch models (tests, demo, benchmark)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def pretrain_causal_lm(
    lm: torch.nn.Module,
    sequences: Sequence[list[int]],
    *,
    pad: int,
    bos: int | None,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    max_context: int = 16,
    progress: bool = True,
) -> list[float]:
    """Train a tiny causal LM (OPT, GPT-2) on token sequences, then freeze it and return the losses.

    Most sequences come after a shuffled, partly dropped bag of their own tokens (up to
    ``max_context``, the length of the image prefix a captioner will put there), a quarter after
    nothing, so that the LM learns to read what precedes the text; ``bos`` (if any) separates the
    two. Only the sequence itself is scored.
    """
    for p in lm.parameters():
        p.requires_grad_(True)
    lm.train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    device = next(lm.parameters()).device
    head = [] if bos is None else [bos]
    losses = []
    for _ in tqdm(range(steps), desc="language model", unit="step", disable=not progress):
        rows, label_rows = [], []
        for _ in range(batch_size):
            body = list(sequences[rng.randrange(len(sequences))])
            context: list[int] = []
            if rng.random() < 0.75:
                context = [i for i in dict.fromkeys(body[:-1]) if rng.random() > 0.2]
                rng.shuffle(context)
                context = context[:max_context]
            rows.append(context + head + body)
            label_rows.append([-100] * (len(context) + len(head)) + body)
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows], device=device)
        mask = (torch.arange(width, device=device)[None, :] < torch.tensor([len(r) for r in rows], device=device)[:, None]).long()
        loss = lm(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.eval()
    return losses
