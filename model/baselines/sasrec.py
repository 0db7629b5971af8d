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

import torch
from torch import nn

from model.baselines.two_tower import OutputItemEmbeddings, fixed_gate
from model.features import FeatureEncoder
from model.nn.items import TowerItemInputs
from model.nn.sequence import SequenceEncoder, oldest_first
from model.nn.two_tower import TwoTowerNet
from model.settings import ModelConfig


class SASRecUserTower(nn.Module):
    def __init__(self, item_vectors: nn.Embedding, max_history: int, config: ModelConfig) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.item_inputs = TowerItemInputs(item_vectors)
        self.encoder = SequenceEncoder(
            dim,
            config.hidden_dim,
            max_history,
            config.sasrec_blocks,
            config.sasrec_heads,
            config.sasrec_dropout,
        )
        self.empty_sequence = nn.Parameter(torch.randn(dim) * 0.05)

    def forward(
        self, profile: torch.Tensor, history: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sequence = oldest_first(history)
        newest = self.encoder(self.item_inputs(sequence), sequence > 0)
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
