"""Stage 1: train one Q-Former branch with ITC + ITM + ITG (BLIP-2, LAVIS ``Blip2Qformer.forward``).

Single-process: LAVIS' cross-GPU gathers reduce to the local batch (rank 0), which must hold
at least two samples so that every sample has a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.msmedcap.qformer import QFormerBranch

LABEL_SMOOTHING = 0.1


def stage1_losses(
    branch: QFormerBranch,
    image_tokens: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    bos_id: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    batch = image_tokens.shape[0]
    if batch < 2:
        raise ValueError("batch size must be at least 2 in stage 1 (each sample needs a negative)")
    with torch.no_grad():
        branch.temp.clamp_(0.001, 0.5)

    # ITC: queries read the image alone; text [CLS] alone; similarity = best query.
    query_out = branch.query_output(image_tokens)
    image_feats = F.normalize(branch.vision_proj(query_out), dim=-1)  # (B, Q, E)
    text_out = branch.text_output(text_ids, text_mask)
    text_feat = F.normalize(branch.text_proj(text_out[:, 0]), dim=-1)  # (B, E)
    sim_i2t = torch.einsum("bqe,te->btq", image_feats, text_feat).max(-1).values / branch.temp
    sim_t2i = torch.einsum("te,bqe->tbq", text_feat, image_feats).max(-1).values / branch.temp
    targets = torch.arange(batch, device=image_tokens.device)
    itc = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)
    ) / 2

    # ITM with hard negatives sampled by ITC similarity. Samples with the same text are not
    # negatives of each other (LAVIS does this with image ids).
    with torch.no_grad():
        same = _same_rows(text_ids, text_mask)
        neg_image = _sample_negatives(sim_t2i, same, generator)
        neg_text = _sample_negatives(sim_i2t, same, generator)
    itm_tokens = torch.cat([image_tokens, image_tokens[neg_image], image_tokens])
    itm_ids = torch.cat([text_ids, text_ids, text_ids[neg_text]])
    itm_mask = torch.cat([text_mask, text_mask, text_mask[neg_text]])
    joint = branch.joint_output(itm_ids, itm_mask, itm_tokens, causal_text=False)
    itm_logits = branch.itm_head(joint[:, : branch.num_queries]).mean(dim=1)
    itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(image_tokens.device)
    itm = F.cross_entropy(itm_logits, itm_labels)

    # ITG: [DEC] replaces [CLS]; text attends to all queries and causally to itself.
    dec_ids = text_ids.clone()
    dec_ids[:, 0] = bos_id
    hidden = branch.joint_output(dec_ids, text_mask, image_tokens, causal_text=True)[:, branch.num_queries :]
    logits = branch.lm_head(hidden)[:, :-1]
    labels = dec_ids.masked_fill(text_mask == 0, -100)[:, 1:]
    itg = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, label_smoothing=LABEL_SMOOTHING)

    return {"itc": itc, "itm": itm, "itg": itg, "loss": itc + itm + itg}


def _same_rows(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    masked = ids.masked_fill(mask == 0, -1)
    return (masked[:, None, :] == masked[None, :, :]).all(-1)


def _sample_negatives(sim: torch.Tensor, same: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    weights = F.softmax(sim.float(), dim=1).masked_fill(same, 0.0)
    # A row whose every other sample shares its text: fall back to any other sample.
    empty = weights.sum(1) <= 0
    if empty.any():
        fallback = (~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)).float()
        weights[empty] = fallback[empty]
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)
