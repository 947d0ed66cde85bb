"""Fast greedy captioning with the frozen OPT: a static KV cache, and on CUDA one graph replay per token.

``transformers``' ``generate`` spends most of a greedy step in Python: for OPT-2.7B at batch 32 a
step launches some 500 kernels, each after its own Python, and the cache grows by concatenation.
A caption's decode loop is the whole of MSMedCap's latency (notes §9: ~53 of ~57 ms per image on
an H100), so this module runs it leanly:

* the KV cache is allocated once per batch size, for the prefix and every new token (static shapes);
* a step is plain tensor code over the model's own weights (``q_proj``, ``fc1``, ... of the HF
  ``OPTForCausalLM``: no copy), with SDPA attention over the cache and a mask of filled positions;
* the step also picks the token (repetition penalty, minimum length, EOS bookkeeping) and advances
  its own position, so on CUDA the whole step is captured once as a CUDA graph and replayed: one
  launch per token instead of hundreds;
* batches are padded to a few sizes (1, 2, 4, ... 64, then multiples of 64), so a worker holds a
  handful of graphs however its batches vary.

Greedy only (``num_beams == 1``, the ``fast`` preset, what production drafts use). Beam search (the
``paper`` preset) stays with ``generate``. The result equals ``generate``'s greedy search on the same
inputs (tested on CPU), apart from floating-point ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def bucket(batch: int) -> int:
    """The padded batch size a graph is captured for: powers of two to 64, then multiples of 64."""
    return 1 << max(0, math.ceil(math.log2(batch))) if batch <= 64 else 64 * math.ceil(batch / 64)


@dataclass(frozen=True)
class Greedy:
    """What a greedy search needs of a generation preset."""

    max_new_tokens: int
    min_new_tokens: int
    repetition_penalty: float
    eos_id: int
    pad_id: int


class _State:
    """Static buffers of one (batch, length) shape: the KV cache and the step's inputs and outputs."""

    def __init__(self, lm: nn.Module, batch: int, length: int, max_new: int, device: torch.device, dtype: torch.dtype) -> None:
        config: Any = lm.config  # an OPTConfig
        heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        shape = (batch, heads, length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # where the next token's K/V go
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # how many new tokens are out
        self.out = torch.zeros(batch, max_new, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch, config.vocab_size, dtype=torch.bool, device=device)
        self.slots = torch.arange(length, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None


class GreedyDecoder:
    """Greedy search over a frozen ``OPTForCausalLM`` from input embeddings (a soft prompt and a text prompt)."""

    def __init__(self, lm: nn.Module, *, graphs: bool = True) -> None:
        if getattr(lm.config, "model_type", "") != "opt":
            raise ValueError(f"GreedyDecoder runs OPT language models, not {getattr(lm.config, 'model_type', '?')}")
        self.lm: Any = lm  # an OPTForCausalLM; nn.Module types its parts as Tensor | Module
        self.decoder: Any = lm.model.decoder  # type: ignore[union-attr]
        self.graphs = graphs
        # One state (and graph) per shape and settings: a graph replays the settings it was captured with.
        self._states: dict[tuple[int, int, Greedy, torch.device, torch.dtype], _State] = {}

    # -- the model, step by step ---------------------------------------------------------------

    def _layers(self, hidden: torch.Tensor, state: _State, start: torch.Tensor, count: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Run the decoder layers on ``count`` new positions from ``start``, writing their K/V into the cache."""
        batch = hidden.shape[0]
        for index, layer in enumerate(self.decoder.layers):
            attention = layer.self_attn
            residual = hidden
            if layer.do_layer_norm_before:
                hidden = layer.self_attn_layer_norm(hidden)
            q = (attention.q_proj(hidden) * attention.scaling).view(batch, count, attention.num_heads, attention.head_dim).transpose(1, 2)
            k = attention.k_proj(hidden).view(batch, count, attention.num_heads, attention.head_dim).transpose(1, 2)
            v = attention.v_proj(hidden).view(batch, count, attention.num_heads, attention.head_dim).transpose(1, 2)
            slots = start + torch.arange(count, device=hidden.device)
            state.keys[index].index_copy_(2, slots, k)
            state.values[index].index_copy_(2, slots, v)
            if mask is None:  # prefill: the prefix attends causally to itself
                attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            else:  # a step: the new token attends to every filled slot
                attended = F.scaled_dot_product_attention(q, state.keys[index], state.values[index], attn_mask=mask, scale=1.0)
            hidden = residual + attention.out_proj(attended.transpose(1, 2).reshape(batch, count, -1))
            if not layer.do_layer_norm_before:
                hidden = layer.self_attn_layer_norm(hidden)
            residual = hidden
            if layer.do_layer_norm_before:
                hidden = layer.final_layer_norm(hidden)
            hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(hidden)))
            if not layer.do_layer_norm_before:
                hidden = layer.final_layer_norm(hidden)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.decoder.final_layer_norm is not None:
            hidden = self.decoder.final_layer_norm(hidden)
        if self.decoder.project_out is not None:
            hidden = self.decoder.project_out(hidden)
        return self.lm.lm_head(hidden).float()

    def _embed(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.decoder.project_in is not None:
            embeds = self.decoder.project_in(embeds)
        weight = self.decoder.embed_positions.weight
        return embeds + weight[positions + self.decoder.embed_positions.offset].to(embeds.dtype)

    def _choose(self, logits: torch.Tensor, state: _State, greedy: Greedy) -> None:
        """Pick each row's token, record it, and advance: all in tensors (graph-safe)."""
        if greedy.repetition_penalty != 1.0:  # as transformers: only the tokens generated so far (the prompt is embeddings)
            penalised = torch.where(logits > 0, logits / greedy.repetition_penalty, logits * greedy.repetition_penalty)
            logits = torch.where(state.seen, penalised, logits)
        if greedy.min_new_tokens > 0:
            too_early = state.step < greedy.min_new_tokens
            logits[:, greedy.eos_id] = torch.where(too_early, torch.full_like(logits[:, 0], -math.inf), logits[:, greedy.eos_id])
        token = torch.where(state.finished, torch.full_like(state.token, greedy.pad_id), logits.argmax(-1))
        state.out.index_copy_(1, state.step, token[:, None])
        state.seen.scatter_(1, token[:, None], True)
        state.finished |= token == greedy.eos_id
        state.token.copy_(token)
        state.step.add_(1)

    def _step(self, state: _State, greedy: Greedy) -> None:
        """One new token for every row: embed the last token, attend to the cache, choose the next."""
        embeds = self.decoder.embed_tokens(state.token)[:, None]
        hidden = self._embed(embeds, state.position[:, None].expand(embeds.shape[0], 1))
        mask = (state.slots <= state.position)[None, None, None, :]
        hidden = self._layers(hidden, state, state.position, 1, mask)
        self._choose(self._logits(hidden[:, -1]), state, greedy)
        state.position.add_(1)

    # -- generation ---------------------------------------------------------------------------------

    def _state(self, batch: int, prefix: int, greedy: Greedy, device: torch.device, dtype: torch.dtype) -> _State:
        key = (batch, prefix, greedy, device, dtype)
        if key not in self._states:
            self._states[key] = _State(self.lm, batch, prefix + greedy.max_new_tokens, greedy.max_new_tokens, device, dtype)
        return self._states[key]

    def _capture(self, state: _State, greedy: Greedy) -> None:
        """Record one step as a CUDA graph (after a warm-up on a side stream, as torch requires)."""
        saved = [t.clone() for t in (state.token, state.position, state.step, state.out, state.finished, state.seen)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(state, greedy)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(state, greedy)
        for live, value in zip((state.token, state.position, state.step, state.out, state.finished, state.seen), saved, strict=True):
            live.copy_(value)  # capturing ran two steps: put the state back
        state.graph = graph

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, greedy: Greedy, check_every: int = 8) -> torch.Tensor:
        """New token ids (B, <= max_new_tokens), ``pad_id`` after each row's EOS, as ``generate`` returns them."""
        rows, prefix = embeds.shape[0], embeds.shape[1]
        if prefix + greedy.max_new_tokens > self.decoder.embed_positions.num_embeddings - self.decoder.embed_positions.offset:
            raise ValueError(
                f"{prefix} prefix + {greedy.max_new_tokens} new tokens exceed the LM's {self.lm.config.max_position_embeddings} positions"
            )
        batch = bucket(rows)
        if batch != rows:
            embeds = torch.cat([embeds, embeds[-1:].expand(batch - rows, -1, -1)])
        device, dtype = embeds.device, self.decoder.embed_tokens.weight.dtype
        state = self._state(batch, prefix, greedy, device, dtype)
        for tensor in (state.position, state.step, state.out, state.finished, state.seen):
            tensor.zero_()
        # Prefill: the prefix through the layers at once, its K/V into the cache, the first token chosen.
        hidden = self._embed(embeds.to(dtype), torch.arange(prefix, device=device)[None].expand(batch, -1))
        hidden = self._layers(hidden, state, torch.zeros(1, dtype=torch.long, device=device), prefix, None)
        self._choose(self._logits(hidden[:, -1]), state, greedy)
        state.position.fill_(prefix)
        use_graph = self.graphs and device.type == "cuda"
        if use_graph and state.graph is None:
            self._capture(state, greedy)
        done = 1
        while done < greedy.max_new_tokens:
            if done % check_every == 0 and bool(state.finished.all()):
                break
            if use_graph:
                state.graph.replay()  # type: ignore[union-attr]
            else:
                self._step(state, greedy)
            done += 1
        out = state.out[:rows, :done]
        # As generate: trim the columns after the last row's EOS.
        finished_at = torch.where(out == greedy.eos_id, torch.arange(done, device=device), done).min(dim=1).values
        return out[:, : int(finished_at.max()) + 1 if bool((finished_at < done).all()) else done].clone()
