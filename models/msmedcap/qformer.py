"""One Q-Former branch: learnable queries that read one frozen image encoder.

Besides the query path used for captioning (queries -> Q-Former -> projection into the LM),
a training branch carries what stage 1 trains with, its *text side*: word and position
embeddings, the text feed-forward layers, ITC projections and temperature, the ITM head, and a
BERT LM head tied to the word embeddings for ITG (LAVIS ``Blip2Qformer``). Inference branches
are built without it (``text_side=False``), as LAVIS deletes it for stage 2.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.activations import ACT2FN
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings


class QFormerLMHead(nn.Module):
    """BERT's ``cls.predictions``: transform, then a decoder tied to the word embeddings."""

    def __init__(self, config: Blip2QFormerConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        # Tied, not copied, and not registered a second time (a checkpoint stores it once).
        self.__dict__["_word_embeddings"] = word_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.layer_norm(self.activation(self.dense(hidden)))
        return hidden @ self.__dict__["_word_embeddings"].weight.t() + self.bias


#: Parameter names of the text side (under a branch): used by stage 1 only.
TEXT_SIDE = re.compile(
    r"^(embeddings\.|vision_proj\.|text_proj\.|itm_head\.|temp$|lm_head\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.)"
)


class QFormerBranch(nn.Module):
    def __init__(
        self, config: Blip2QFormerConfig, num_query_tokens: int, lm_hidden_size: int, itc_dim: int, text_side: bool = True
    ) -> None:
        super().__init__()
        config.use_qformer_text_input = text_side  # the text feed-forward layers exist only with it
        self.config = config
        self.text_side = text_side
        # HF initialises query tokens to zeros, which leaves every query identical: use LAVIS' N(0, 0.02).
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, config.hidden_size) * config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        if text_side:
            self.embeddings = Blip2TextEmbeddings(config)
            self.vision_proj = nn.Linear(config.hidden_size, itc_dim)
            self.text_proj = nn.Linear(config.hidden_size, itc_dim)
            self.itm_head = nn.Linear(config.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.lm_head = QFormerLMHead(config, self.embeddings.word_embeddings)
        self.language_projection = nn.Linear(config.hidden_size, lm_hidden_size)
        self._init_new_weights()

    def _init_new_weights(self) -> None:
        std = self.config.initializer_range
        text = (self.embeddings, self.vision_proj, self.text_proj, self.itm_head, self.lm_head) if self.text_side else ()
        for module in (*text, self.language_projection):
            for sub in module.modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(sub.weight, std=std)
                    if isinstance(sub, nn.Linear) and sub.bias is not None:
                        nn.init.zeros_(sub.bias)
        # Cross-attention keys/values by fan-in (LeCun) rather than BERT's fixed 0.02: encoder
        # tokens are 1408 (EVA), 4096 (SAM, channel layout) or 256 (SAM, spatial) wide, and a
        # fixed std would give one encoder's values several times the other's at the start.
        # Pretrained Q-Formers (compose) overwrite this for the CLIP branch.
        layers: Any = self.qformer.encoder.layer
        for layer in layers:
            if layer.has_cross_attention:
                for linear in (layer.crossattention.attention.key, layer.crossattention.attention.value):
                    nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
                    nn.init.zeros_(linear.bias)

    @property
    def num_queries(self) -> int:
        return int(self.query_tokens.shape[1])

    def query_output(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Queries after reading the image: (B, num_queries, hidden)."""
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        ones = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_tokens, encoder_attention_mask=ones)
        return out.last_hidden_state

    def lm_inputs(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Soft prompt for the language model: (B, num_queries, lm_hidden)."""
        hidden = self.query_output(image_tokens)
        return self.language_projection(hidden.to(self.language_projection.weight.dtype))

    def require_text_side(self) -> None:
        if not self.text_side:
            raise ValueError(
                "this is an inference checkpoint: its Q-Formers have no text side, which stage 1 trains "
                "(start stage 1 from a checkpoint made by `medcap model compose`)"
            )

    def text_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone through the Q-Former (bidirectional): (B, T, hidden)."""
        self.require_text_side()
        embeds = self.embeddings(input_ids=input_ids)
        return self.qformer(query_embeds=embeds, query_length=0, attention_mask=attention_mask).last_hidden_state

    def joint_output(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor, causal_text: bool
    ) -> torch.Tensor:
        """Queries and text together; cross-attention on the query slice only.

        ``causal_text=False`` is the ITM mask (all bidirectional). ``causal_text=True`` is the
        ITG (UniLM) mask: queries see queries, text sees all queries and earlier text.
        """
        self.require_text_side()
        batch, q = input_ids.shape[0], self.num_queries
        queries = self.query_tokens.expand(batch, -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        keys = torch.cat([torch.ones(batch, q, dtype=torch.bool, device=input_ids.device), attention_mask.bool()], dim=1)
        if causal_text:
            mask = unilm_mask(q, input_ids.shape[1], keys)
        else:
            mask = keys[:, None, None, :].expand(batch, 1, q + input_ids.shape[1], -1)
        ones = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        out = self.qformer(
            query_embeds=embeds, query_length=q, attention_mask=mask, encoder_hidden_states=image_tokens, encoder_attention_mask=ones
        )
        return out.last_hidden_state


def unilm_mask(num_queries: int, text_len: int, key_padding: torch.Tensor) -> torch.Tensor:
    """(B, 1, Q+T, Q+T) boolean mask: Q rows see Q; T rows see Q and causal T; padding hidden."""
    total = num_queries + text_len
    allowed = torch.zeros(total, total, dtype=torch.bool, device=key_padding.device)
    allowed[:, :num_queries] = True
    allowed[:num_queries, num_queries:] = False
    allowed[num_queries:, num_queries:] = torch.tril(torch.ones(text_len, text_len, dtype=torch.bool, device=key_padding.device))
    return allowed[None, None] & key_padding[:, None, None, :]
