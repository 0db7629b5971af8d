"""Item side: the item tower (target items) and the item input embedding (items in a user's history)."""

from __future__ import annotations

import torch
from torch import nn

from model.features import FeatureEncoder, ItemFeatures
from model.nn.layers import mlp
from model.settings import ModelConfig


class ItemSideInputs(nn.Module):
    """Per-catalog-position item features as buffers, so every tower can look items up by position."""

    def __init__(self, features: ItemFeatures) -> None:
        super().__init__()
        genres = torch.as_tensor(features.genres, dtype=torch.float32)
        self.register_buffer("id_index", torch.as_tensor(features.id_index, dtype=torch.long))
        # Rows normalised so an item's genre embedding is the mean of its genres'.
        self.register_buffer("genres", genres / genres.sum(dim=1, keepdim=True).clamp(min=1.0))
        self.register_buffer("year", torch.as_tensor(features.year, dtype=torch.long))
        self.register_buffer("popularity", torch.as_tensor(features.popularity, dtype=torch.long))
        self.n_items = int(len(features.id_index))
        self.n_genres = int(genres.shape[1])
        self.n_years = int(features.year.max()) + 1 if len(features.year) else 2
        self.n_popularity = int(features.popularity.max()) + 1 if len(features.popularity) else 2


class ItemInputEmbedding(nn.Module):
    """Embeds history entries (catalog position + 1, 0 = padding) from item id and genres."""

    def __init__(self, items: ItemSideInputs, dim: int, n_id_embeddings: int) -> None:
        super().__init__()
        self.items = items
        self.ids = nn.Embedding(n_id_embeddings, dim, padding_idx=0)
        self.genres = nn.Linear(items.n_genres, dim, bias=False)
        self.out_dim = dim

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        position = (history - 1).clamp(min=0)
        embedded = self.ids(self.items.id_index[position]) + self.genres(self.items.genres[position])
        return embedded * (history > 0).unsqueeze(-1).to(embedded.dtype)


class TowerItemInputs(nn.Module):
    """History entries (catalog position + 1, 0 = padding) embedded by what embeds the target items (an
    item tower, or an embedding table over catalog positions), so the history and the targets share
    one item representation, as in SASRec."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        position = (history - 1).clamp(min=0)
        embedded = self.tower(position.reshape(-1)).view(history.shape[0], history.shape[1], -1)
        return embedded * (history > 0).unsqueeze(-1).to(embedded.dtype)


class ItemTower(nn.Module):
    """e_i from item id, genres, year and popularity bucket, for every catalog position."""

    def __init__(
        self, items: ItemSideInputs, dim: int, feature_dim: int, hidden_dim: int, n_id_embeddings: int
    ) -> None:
        super().__init__()
        self.items = items
        self.ids = nn.Embedding(n_id_embeddings, dim)
        self.genres = nn.Linear(items.n_genres, feature_dim, bias=False)
        self.year = nn.Embedding(max(items.n_years, 2), feature_dim)
        self.popularity = nn.Embedding(max(items.n_popularity, 2), feature_dim)
        self.side = mlp(3 * feature_dim, hidden_dim, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        side = torch.cat(
            [
                self.genres(self.items.genres[positions]),
                self.year(self.items.year[positions]),
                self.popularity(self.items.popularity[positions]),
            ],
            dim=1,
        )
        return self.ids(self.items.id_index[positions]) + self.side(side)


def item_tower_for(encoder: FeatureEncoder, items: ItemSideInputs, config: ModelConfig) -> ItemTower:
    """The item tower every model here uses, sized by the config and the item-id vocabulary."""
    n_ids = len(encoder.vocabularies["item_id"])
    return ItemTower(items, config.embedding_dim, config.feature_dim, config.hidden_dim, n_ids)


class StagePopularity(nn.Module):
    """Per catalog position, the item's stage popularity columns (model/stage_popularity.py): counted
    from the training samples once, not learnt, and kept in the state dict so that an exported net
    scores as the trained one; beside them, the same columns less one count, for a sample's own
    target in training."""

    def __init__(self, n_items: int, first_stage: int, n_stages: int) -> None:
        super().__init__()
        self.first_stage = first_stage
        self.width = n_stages - first_stage
        self.register_buffer("table", torch.zeros(n_items, self.width))
        self.register_buffer("without_own", torch.zeros(n_items, self.width))

    def set_columns(self, table: torch.Tensor, without_own: torch.Tensor) -> None:
        self.table.copy_(table)
        self.without_own.copy_(without_own)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]

    def own_target_change(self, targets: torch.Tensor, stages: torch.Tensor) -> torch.Tensor:
        """(B, width): what leaving each sample out of the counts changes in its target's columns,
        which are those of its own stage (count bucket) and later."""
        columns = torch.arange(self.first_stage, self.first_stage + self.width, device=stages.device)
        counted_it = (columns.unsqueeze(0) >= stages.unsqueeze(1)).to(self.table.dtype)
        return (self.without_own[targets] - self.table[targets]) * counted_it
