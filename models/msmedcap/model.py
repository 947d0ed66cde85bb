"""MSMedCap and its single-encoder baselines, one implementation.

LLM input: ``[proj_clip(Q_clip) ; proj_sam(Q_sam) ; embed(BOS + prompt [+ caption])]``. Encoders
and the OPT language model are frozen in both stages; stage 2 trains the Q-Formers, their
queries and projections with the LM loss (stage 1 is in ``models/stage1.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, OPTForCausalLM, SamVisionConfig

from models.frozen import freeze
from models.generation import GenerationPreset
from models.msmedcap.config import MedCapConfig
from models.msmedcap.decoding import Greedy, GreedyDecoder
from models.msmedcap.encoders import ClipEncoder, SamEncoder
from models.msmedcap.qformer import TEXT_SIDE, QFormerBranch
from models.msmedcap.tokenizers import Tokenizers

IGNORE = -100


class MedCapModel(nn.Module):
    def __init__(self, config: MedCapConfig) -> None:
        super().__init__()
        self.config = config
        self.lm: Any = OPTForCausalLM(OPTConfig(**config.lm))  # Any: transformers types generate() for another self
        encoders: dict[str, nn.Module] = {}
        if "clip" in config.branches:
            encoders["clip"] = ClipEncoder(Blip2VisionConfig(**config.clip_vision))  # type: ignore[arg-type]
        if "sam" in config.branches:
            encoders["sam"] = SamEncoder(SamVisionConfig(**config.sam_vision), config.sam_layout)  # type: ignore[arg-type]
        self.encoders = nn.ModuleDict(encoders)
        self.branches = nn.ModuleDict({name: self.new_branch(name) for name in encoders})
        #: Greedy captions through :class:`GreedyDecoder` (False: transformers' ``generate``, the reference).
        self.fast_greedy = True
        self._greedy: GreedyDecoder | None = None
        freeze(self.lm)
        for encoder in self.encoders.values():
            freeze(encoder)

    def new_branch(self, name: str) -> QFormerBranch:
        """A freshly initialised Q-Former branch reading encoder ``name`` (compose builds the
        pretrained parts without memory, then replaces the branches with real ones)."""
        encoder: Any = self.encoders[name]
        config = Blip2QFormerConfig(**self.config.qformer, encoder_hidden_size=encoder.width)
        return QFormerBranch(
            config, self.config.num_query_tokens, self.lm.config.hidden_size, self.config.itc_dim, text_side=self.config.qformer_text
        )

    # -- images ----------------------------------------------------------------------------

    @torch.no_grad()
    def image_tokens(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Frozen encoders: {branch: (B, N, D)} for the branches given in ``pixels``."""
        unknown = set(pixels) - set(self.encoders)
        if unknown:
            raise ValueError(f"pixels: no branch {sorted(unknown)} in {self.config.display_name}")
        out = {}
        for name, batch in pixels.items():
            param = next(self.encoders[name].parameters())
            out[name] = self.encoders[name](batch.to(device=param.device, dtype=param.dtype))
        return out

    def soft_prompt(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, sum of queries, LM hidden): CLIP queries first, then SAM's (the paper's order)."""
        missing = set(self.branches) - set(tokens)
        if missing:
            raise ValueError(f"missing input for branch(es) {sorted(missing)} of {self.config.display_name}")
        dtype = self.lm.get_input_embeddings().weight.dtype
        branches: Any = self.branches  # QFormerBranch modules
        return torch.cat([branches[name].lm_inputs(tokens[name]).to(dtype) for name in branches], dim=1)

    # -- stage 2 ---------------------------------------------------------------------------

    def forward(
        self,
        pixels: dict[str, torch.Tensor],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        image_tokens: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """LM loss on the caption tokens (labels are -100 on BOS, prompt and padding).

        ``image_tokens`` may carry precomputed encoder outputs (the encoders are frozen).
        """
        tokens = image_tokens if image_tokens is not None else self.image_tokens(pixels)
        prefix = self.soft_prompt(tokens)
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        ignore = torch.full(prefix.shape[:2], IGNORE, dtype=labels.dtype, device=labels.device)
        out = self.lm(inputs_embeds=embeds, attention_mask=torch.cat([ones, attention_mask], 1), labels=torch.cat([ignore, labels], 1))
        return out.loss

    # -- inference -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixels: dict[str, torch.Tensor],
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        preset: GenerationPreset,
        eos_token_id: int,
        pad_token_id: int,
        image_tokens: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """New token ids only (the prompt is given as embeddings, so it is not echoed).

        Greedy presets run :class:`GreedyDecoder` (static KV cache; one CUDA graph replay per token
        on a GPU); beam search runs transformers' ``generate``.
        """
        prefix = self.soft_prompt(image_tokens if image_tokens is not None else self.image_tokens(pixels))
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(prompt_ids)], dim=1)
        if preset.num_beams == 1 and self.fast_greedy and bool(prompt_mask.all()):
            if self._greedy is None:
                self._greedy = GreedyDecoder(self.lm)
            return self._greedy.generate(
                embeds, Greedy(preset.max_new_tokens, preset.min_new_tokens, preset.repetition_penalty, eos_token_id, pad_token_id)
            )
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=prompt_mask.dtype, device=prompt_mask.device), prompt_mask], 1)
        return self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            do_sample=False,
            num_beams=preset.num_beams,
            max_new_tokens=preset.max_new_tokens,
            min_new_tokens=preset.min_new_tokens,
            repetition_penalty=preset.repetition_penalty,
            length_penalty=preset.length_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )

    # -- the captioner interface (models/families.py) ----------------------------------------

    def encode(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoder tokens of the views given that this model reads (stage 1 encodes one branch only)."""
        return self.image_tokens({b: v for b, v in pixels.items() if b in self.encoders})

    def caption_loss(self, features: dict[str, torch.Tensor], captions: Sequence[str], text: Tokenizers) -> torch.Tensor:
        """Stage 2's LM loss."""
        device = next(self.lm.parameters()).device
        batch = text.lm_batch(list(captions), self.config.prompt, self.config.eos_text, self.config.max_text_tokens)
        return self(pixels={}, image_tokens=features, **{k: v.to(device) for k, v in batch.items()})

    @torch.no_grad()
    def generate_captions(self, features: dict[str, torch.Tensor], text: Tokenizers, preset: GenerationPreset) -> list[str]:
        count = next(iter(features.values())).shape[0]
        device = next(self.lm.parameters()).device
        prompt = {k: v.to(device) for k, v in text.prompt_batch(self.config.prompt, count).items()}
        ids = self.generate(
            {},
            prompt["input_ids"],
            prompt["attention_mask"],
            preset,
            text.eos_id(self.config.eos_text),
            int(text.lm.pad_token_id),
            image_tokens=features,
        )
        return [caption.strip() for caption in text.lm.batch_decode(ids, skip_special_tokens=True)]

    def place(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """Frozen encoders and the LM in ``dtype``, Q-Formers, queries and projections in fp32 (as
        HF BLIP-2 keeps them). Each part is cast where it lies, then moved: the device never
        holds a part in a wider dtype than it runs in (a bf16 LM never passes through the GPU as fp32)."""
        frozen_dtype = dtype or torch.float32
        self._greedy = None  # its caches and graphs belong to the old placement
        for part in [self.lm, *self.encoders.values()]:
            part.to(dtype=frozen_dtype)
            part.to(device)
        self.branches.to(dtype=torch.float32)
        self.branches.to(device)

    # -- bookkeeping -----------------------------------------------------------------------

    def trainable_parameters(self, stage: str = "stage2", branch: str | None = None) -> list[nn.Parameter]:
        """Stage 1: one Q-Former branch (queries, Q-Former, text side, heads). Stage 2: every
        branch's queries, query path of the Q-Former and projection; encoders and LM never."""
        if stage == "stage1":
            if branch is None or branch not in self.branches:
                raise ValueError(f"branch: {branch!r} is not one of {sorted(self.branches)}")
            chosen: Any = self.branches[branch]
            chosen.require_text_side()
            return [p for n, p in chosen.named_parameters() if not n.startswith("language_projection.")]
        if stage == "stage2":
            # The query path only: the text side gets no gradient from the LM loss (LAVIS deletes it).
            return [p for b in self.branches.values() for n, p in b.named_parameters() if not TEXT_SIDE.match(n)]
        raise ValueError(f"stage: {stage!r} is not stage1 or stage2")
