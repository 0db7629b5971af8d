"""Causal self-attention over an action sequence: the transformer parts SASRec and the warm expert share.

Sequences are oldest → newest and left-padded (0 = padding), so the last column is always the newest
item; ``oldest_first`` turns the encoder's newest-first, right-padded history into that layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention of ``queries`` over ``context``, where ``blocked``
    (B, Q, L) marks the (query, key) pairs that must not attend."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"embedding_dim {dim} is not divisible by sasrec_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.weights_dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        batch, n_queries, dim = queries.shape
        q = self.query(queries).view(batch, n_queries, self.n_heads, self.head_dim).transpose(1, 2)
        kv = self.key_value(context).view(batch, context.shape[1], 2, self.n_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(blocked.unsqueeze(1), float("-inf"))
        weights = self.weights_dropout(torch.softmax(scores, dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(batch, n_queries, dim))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attention(LN(x)), then x + FFN(LN(x)), with dropout on each residual branch."""

    def __init__(self, dim: int, hidden_dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, n_heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor, newest_only: bool) -> torch.Tensor:
        """(B, L, d) → (B, L, d), or (B, 1, d) for the newest position alone when ``newest_only``."""
        normed = self.attention_norm(x)
        queries = normed
        if newest_only:
            x, queries, blocked = x[:, -1:], normed[:, -1:], blocked[:, -1:]
        x = x + self.dropout(self.attention(queries, normed, blocked))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SequenceEncoder(nn.Module):
    """The output at the newest position of causal self-attention blocks over a left-padded,
    oldest → newest sequence of item vectors: item vectors scaled by √d plus learnt positions (counted
    from the newest, since the newest item is always last), the blocks, a final LayerNorm. Only the
    last block's newest query is computed. SASRec's user tower and the warm expert's attention pooling
    are this encoder."""

    def __init__(
        self, dim: int, hidden_dim: int, max_history: int, n_blocks: int, n_heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.positions = nn.Embedding(max_history, dim)
        nn.init.normal_(self.positions.weight, std=0.05)
        self.input_scale = math.sqrt(dim)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [TransformerBlock(dim, hidden_dim, n_heads, dropout) for _ in range(n_blocks)]
        )
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, embedded: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, d) item vectors of a left-padded sequence and its (B, L) non-padding mask → (B, d)."""
        keep = valid.unsqueeze(-1).to(embedded.dtype)
        positions = self.positions.weight[-valid.shape[1] :].unsqueeze(0)
        x = self.input_dropout(embedded * self.input_scale + positions) * keep
        blocked = blocked_pairs(valid)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x = block(x, blocked, index == last)
            if index < last:
                x = x * keep  # padding positions stay zero, as SASRec's timeline mask keeps them
        return self.final_norm(x[:, -1])

    def read_history(
        self, embedded: torch.Tensor, history: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder over a user tower's history: (B, L, d) embeddings of the newest-first, right-padded
        ``history`` (B, L) → (newest output (B, d), (B, 1) whether the user has any history)."""
        sequence = oldest_first(history)
        valid = sequence > 0
        # The encoder's layout: the embeddings reversed to oldest → newest, the all-padding columns cut.
        inputs = embedded.flip(1)[:, embedded.shape[1] - sequence.shape[1] :]
        return self.forward(inputs, valid), valid[:, -1:]


def blocked_pairs(valid: torch.Tensor) -> torch.Tensor:
    """(B, L, L): True where query i must not see key j, i.e. j is in i's future or j is padding.

    A query always sees itself: a padding query then has one finite score instead of a softmax over
    nothing (NaN), and a real query is unaffected since it is not padding.
    """
    length = valid.shape[1]
    future = torch.ones(length, length, dtype=torch.bool, device=valid.device).triu(1)
    itself = torch.eye(length, dtype=torch.bool, device=valid.device)
    return future.unsqueeze(0) | ~(valid.unsqueeze(1) | itself.unsqueeze(0))


def oldest_first(history: torch.Tensor) -> torch.Tensor:
    """The encoder's newest-first, right-padded history as an oldest → newest, left-padded sequence,
    the newest item last; the columns that are padding for every row are cut (they change nothing)."""
    sequence = history.flip(1)
    # TorchScript skips the block (it cannot compile torch.compiler), and its own programs keep the cut.
    if not torch.jit.is_scripting():  # noqa: SIM102
        if torch.compiler.is_exporting():
            # The cut's width depends on the data, which a torch.export program cannot have; uncut,
            # the padding columns are masked out and the answers are the same (bench/export_format.py).
            return sequence
    used = (sequence > 0).any(dim=0)
    start = int(used.to(torch.int64).argmax()) if bool(used.any()) else sequence.shape[1] - 1
    return sequence[:, start:]
