"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the user's action sequence.

The user tower reads only the history (no profile, no state): item embeddings scaled by √d plus
learned positional embeddings, ``sasrec_blocks`` pre-LN transformer blocks with causal attention over
the sequence ordered oldest → newest, and the final LayerNorm'd output at the newest position is e_u.
Training is the project's: prefix samples already give one sample per (user, position), so only the
newest position's output is needed (no per-position loss), and the model is still causal. The last
block therefore computes only the newest query.

Choices, measured on synthetic data (400 users, 150 items, max_history 20, 2 epochs, batch 128, data
seeds 0-3), warm validation / test users (h >= 10), Recall@50 averaged over the seeds:
- Input item vectors are the output vectors (SASRec's shared item embedding): 0.708 / 0.731, against
  0.662 / 0.685 with a separate id + genre ``ItemInputEmbedding``; on this little data, every
  training sample then also trains the items of its history, not only its target.
- Score = dot product (like YouTubeDNN; scale fixed at 1): 0.708 / 0.731, against 0.658 / 0.683 for a
  scaled cosine with a learnt scale. Most-popular: 0.637 / 0.660; YouTubeDNN, which also sees the
  profile: 0.772 / 0.789.
- Loss: the project's sampled softmax (in-batch + shared uniform negatives, log-Q corrected), not
  SASRec's BCE with one negative: Klenitskiy & Vasilev (RecSys 2023) and Petrov & Macdonald (RecSys
  2023, gSASRec) show that SASRec trained with a softmax or with many negatives is much stronger.
- An empty history (a cold user) gives nothing to attend to: e_u is then a learned "empty sequence"
  vector. It is trained by the first-interaction samples only, so it ranks by a learned prior over
  first items, much like most-popular (what the protocol's h = 0 rewards); SASRec has no profile.
- b_u = 0 and a fixed all-warm gate, like the other learnt baselines.

Reference points, not comparable with our figures: their protocol is leave-one-out on the whole
SASRec-preprocessed ML-1M (one target, the user's last item, for users seen in training), ours ranks
10 next items for unseen test users after h of their first interactions (Recall over 10 targets).
- Kang & McAuley 2018, ML-1M: HR@10 0.8245, NDCG@10 0.5905, but ranked against 100 sampled negatives,
  not the full catalogue.
- Full-catalogue ranking, from the official gSASRec PyTorch port (github.com/asash/gSASRec-pytorch,
  README; Petrov & Macdonald, "gSASRec", RecSys 2023): SASRec (BCE, 1 negative) Recall@10 0.2392,
  NDCG@10 0.1259; gSASRec (gBCE, 128 negatives, t = 0.75) Recall@10 0.3003, NDCG@10 0.1726.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.baselines.two_tower import OutputItemEmbeddings, fixed_gate
from model.features import FeatureEncoder
from model.nn.two_tower import TwoTowerNet
from model.settings import ModelConfig


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
    used = (sequence > 0).any(dim=0)
    start = int(used.to(torch.int64).argmax()) if bool(used.any()) else sequence.shape[1] - 1
    return sequence[:, start:]


class SharedItemInputs(nn.Module):
    """History entries (catalog position + 1, 0 = padding) looked up in the output item vectors."""

    def __init__(self, vectors: nn.Embedding) -> None:
        super().__init__()
        self.vectors = vectors

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        embedded = self.vectors((sequence - 1).clamp(min=0))
        return embedded * (sequence > 0).unsqueeze(-1).to(embedded.dtype)


class SASRecUserTower(nn.Module):
    def __init__(self, item_vectors: nn.Embedding, max_history: int, config: ModelConfig) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.item_inputs = SharedItemInputs(item_vectors)
        # The sequence is left-padded, so the last row always embeds the newest item, the one before it
        # the second newest, and so on: a position says how recent an item is.
        self.positions = nn.Embedding(max_history, dim)
        nn.init.normal_(self.positions.weight, std=0.05)
        self.input_scale = math.sqrt(dim)
        self.input_dropout = nn.Dropout(config.sasrec_dropout)
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(dim, config.hidden_dim, config.sasrec_heads, config.sasrec_dropout)
                for _ in range(config.sasrec_blocks)
            ]
        )
        self.final_norm = nn.LayerNorm(dim)
        self.empty_sequence = nn.Parameter(torch.randn(dim) * 0.05)

    def encode_sequence(self, sequence: torch.Tensor) -> torch.Tensor:
        """(B, d): the transformer's output at the newest (last) position of a left-padded sequence."""
        valid = sequence > 0
        keep = valid.unsqueeze(-1).to(self.positions.weight.dtype)
        positions = self.positions.weight[-sequence.shape[1] :].unsqueeze(0)
        x = self.input_dropout(self.item_inputs(sequence) * self.input_scale + positions) * keep
        blocked = blocked_pairs(valid)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x = block(x, blocked, index == last)
            if index < last:
                x = x * keep  # padding positions stay zero, as SASRec's timeline mask keeps them
        return self.final_norm(x[:, -1])

    def forward(
        self, profile: torch.Tensor, history: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sequence = oldest_first(history)
        newest = self.encode_sequence(sequence)
        has_history = (sequence[:, -1] > 0).unsqueeze(1)
        e_u = torch.where(has_history, newest, self.empty_sequence.unsqueeze(0).expand_as(newest))
        return (
            e_u,
            torch.zeros(profile.shape[0], dtype=torch.float32, device=profile.device),
            fixed_gate(state),
        )


class SASRec(TwoTowerNet):
    def __init__(self, encoder: FeatureEncoder, config: ModelConfig) -> None:
        n_items = len(encoder.catalog_item_ids)
        super().__init__(n_items, 1.0, learn_scale=False)
        self.item_scorer = OutputItemEmbeddings(n_items, config.embedding_dim)
        self.user_tower = SASRecUserTower(self.item_scorer.vectors, encoder.config.max_history, config)
