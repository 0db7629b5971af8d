"""Cold & Warm Net: gated two-expert user tower, item tower, scaled cosine plus the bias net.

score(u, i) = s · cos(e_u, e_i) + b_u + b_i, with e_u = w_cold · e_cold + w_warm · e_warm; with
``ModelConfig.similarity="dot"`` the towers' vectors are not normalised and s is fixed at 1.

With ``ModelConfig.state_item_dims`` = k > 0, e_u gains g(state) / s (k values from the state
features) and e_i gains v_i (k learnt values per item), adding <g(state), v_i> to every score, outside
the scale as b_i is: what a user at that state picks, whatever the profile and the history say.
With ``ModelConfig.stage_popularity`` v_i is not learnt but counted, the item's stage popularity
(model/stage_popularity.py), one value per interaction-count bucket from the first
``stage_popularity_from`` actions on; ColdWarmNet.set_stage_popularity sets it from the training
samples.

With ``ModelConfig.expert_mixing="score"`` each expert ranks in its own item space and the gate mixes
the scores: score(u, i) = s · (w_cold · cos(e_cold, e_i^cold) + w_warm · cos(e_warm, e_i^warm)) + b_u
+ b_i, which is still one inner product, e_u = [w_cold · ê_cold ; w_warm · ê_warm] against
e_i = [ê_i^cold ; ê_i^warm] (2d wide), so the index and the service need nothing else.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.features import COUNT_COLUMN, PROFILE_COLUMNS, STATE_COLUMNS, FeatureEncoder, bucketise
from model.nn.bias_net import SideBias
from model.nn.experts import (
    ActionPooling,
    AttentionPooling,
    ColdExpert,
    NewestReading,
    SequenceWarmExpert,
    WarmExpert,
)
from model.nn.gate import StateGate
from model.nn.group_attention import GroupAttention
from model.nn.items import (
    ItemInputEmbedding,
    ItemSideInputs,
    ItemTower,
    StagePopularity,
    TowerItemInputs,
    item_tower_for,
)
from model.nn.layers import CategoricalEmbeddings, mlp
from model.nn.two_tower import TwoTowerNet
from model.settings import ModelConfig

USER_BIAS_CANDIDATES: tuple[str, ...] = (*PROFILE_COLUMNS, *STATE_COLUMNS)
ITEM_BIAS_BASE_CANDIDATES: tuple[str, ...] = ("item_id", "year", "popularity")


def item_bias_candidate_names(encoder: FeatureEncoder) -> list[str]:
    return [*ITEM_BIAS_BASE_CANDIDATES, *(f"genre={g}" for g in encoder.vocabularies["genre"].values)]


def item_bias_candidate_matrix(items: ItemSideInputs) -> torch.Tensor:
    """(n_items, 3 + G) codes: id, year, popularity and one 0/1 flag per genre (missing column dropped)."""
    flags = (items.genres[:, 2:] > 0).long()
    base = torch.stack([items.id_index, items.year, items.popularity], dim=1)
    return torch.cat([base, flags], dim=1)


def history_item_inputs(
    encoder: FeatureEncoder, items: ItemSideInputs, config: ModelConfig, item_tower: ItemTower
) -> nn.Module:
    """How the warm expert embeds history items: their own embedding, or the item tower's vectors."""
    if config.warm_item_inputs == "item_tower":
        return TowerItemInputs(item_tower)
    return ItemInputEmbedding(items, config.embedding_dim, len(encoder.vocabularies["item_id"]))


def action_pooling(max_history: int, config: ModelConfig) -> nn.Module:
    """(B, L, d) history embeddings → action features: (B, d) for the sequence warm expert, else (B, 2d)
    as ``config.warm_pooling`` says."""
    if config.warm_expert == "sequence":
        return NewestReading(
            config.embedding_dim,
            config.hidden_dim,
            max_history,
            config.sasrec_blocks,
            config.sasrec_heads,
            config.sasrec_dropout,
        )
    if config.warm_pooling == "attention":
        return AttentionPooling(
            config.embedding_dim,
            config.hidden_dim,
            max_history,
            config.warm_attention_blocks,
            config.warm_attention_dropout,
        )
    return ActionPooling(max_history)


def warm_expert(user_dim: int, attention: GroupAttention, config: ModelConfig) -> nn.Module:
    """(profile features, action features) → e_warm, as ``config.warm_expert`` says."""
    dim, hidden = config.embedding_dim, config.hidden_dim
    if config.warm_expert == "sequence":
        return SequenceWarmExpert(user_dim, dim, hidden)
    return WarmExpert(
        user_dim, 2 * dim, dim, hidden, attention, config.use_group_attention, config.warm_action_skip
    )


def stage_popularity_stages(encoder: FeatureEncoder, config: ModelConfig) -> range:
    """The interaction-count buckets that have a stage popularity column: from the one holding
    ``stage_popularity_from`` - 1 actions to the last."""
    bounds = tuple(float(b) for b in encoder.config.count_bounds)
    first = int(bucketise(np.array([config.stage_popularity_from - 1]), bounds)[0])
    return range(first, encoder.state_cardinalities()[COUNT_COLUMN])


def state_term_width(encoder: FeatureEncoder, config: ModelConfig) -> int:
    """k of the state term: one value per stage popularity column with ``stage_popularity``, else
    ``state_item_dims`` (0: no term)."""
    if config.stage_popularity:
        return len(stage_popularity_stages(encoder, config))
    return config.state_item_dims


def state_item_term(
    state_cardinalities: tuple[int, ...], feature_dim: int, hidden_dim: int, width: int
) -> nn.Module | None:
    """g(state) of the state term: state → (B, width); None at width 0."""
    if not width:
        return None
    embeddings = CategoricalEmbeddings(state_cardinalities, feature_dim)
    return nn.Sequential(embeddings, mlp(embeddings.out_dim, hidden_dim, width))


def item_state_term(encoder: FeatureEncoder, n_items: int, config: ModelConfig) -> nn.Module | None:
    """The items' side of the state term: stage popularity (counted, set by training), or v_i learnt
    per catalog position, small so that it starts as a slight change to the scores."""
    if config.stage_popularity:
        stages = stage_popularity_stages(encoder, config)
        return StagePopularity(n_items, stages.start, stages.stop)
    if not config.state_item_dims:
        return None
    learnt = nn.Embedding(n_items, config.state_item_dims)
    nn.init.normal_(learnt.weight, std=0.01)
    return learnt


def expert_state_columns(config: ModelConfig) -> list[int]:
    """The state columns the experts read beside the profile (none without expert_state_input)."""
    if not config.expert_state_input:
        return []
    return [COUNT_COLUMN] if config.expert_state_columns == "count" else list(range(len(STATE_COLUMNS)))


class UserTower(nn.Module):
    """(profile, history, state) → (normalised e_u, b_u, gate weights); what the service runs."""

    def __init__(
        self,
        encoder: FeatureEncoder,
        items: ItemSideInputs,
        config: ModelConfig,
        user_bias_columns: list[int],
        item_tower: ItemTower,
        log_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        dim, hidden, feature = config.embedding_dim, config.hidden_dim, config.feature_dim
        self.profile = CategoricalEmbeddings(encoder.profile_cardinalities(), feature)
        # With expert_state_input the experts read the state beside the profile; a table set without
        # columns (out_dim 0) otherwise, so the exported tower has one shape of code either way.
        read = expert_state_columns(config)
        self.expert_state = CategoricalEmbeddings([encoder.state_cardinalities()[c] for c in read], feature)
        self.register_buffer("expert_state_read", torch.tensor(read, dtype=torch.long), persistent=False)
        user_dim = self.profile.out_dim + self.expert_state.out_dim
        self.item_inputs = history_item_inputs(encoder, items, config, item_tower)
        self.pooling = action_pooling(encoder.config.max_history, config)
        self.attention = GroupAttention(config.n_user_groups, dim)
        self.cold = ColdExpert(user_dim, dim, hidden, self.attention, config.use_group_attention)
        self.warm = warm_expert(user_dim, self.attention, config)
        self.gate = StateGate(
            encoder.state_cardinalities(), feature, hidden, config.use_cold_expert, config.use_warm_expert
        )
        cardinalities = [*encoder.profile_cardinalities(), *encoder.state_cardinalities()]
        self.user_bias = SideBias(
            user_bias_columns if config.use_bias_net else [], cardinalities, feature, hidden
        )
        self.normalized = config.similarity == "cosine"
        self.mix_scores = config.expert_mixing == "score"
        # g(state): an MLP over embeddings of its own (the gate's train on in the warm phase, this
        # term is frozen with the cold side), k wide.
        self.state_items = state_item_term(
            encoder.state_cardinalities(), feature, hidden, state_term_width(encoder, config)
        )
        self._share_score_scale(log_scale)

    def _share_score_scale(self, log_scale: torch.Tensor | None) -> None:
        """With a state term, the net's learnt log s, shared (the same parameter), so that g(state)
        can leave the query as g / s: the state term is then added as <g, v_i>, outside the cosine's
        temperature as b_i is. Scaled by s it pulled s down (8.8 against 14.8 after three epochs on
        MovieLens), softening the experts' cosines, and the net trained worse. Otherwise a fixed
        log s outside the state dict (a net without the term saves what it saved before)."""
        if self.state_items is not None and isinstance(log_scale, nn.Parameter):
            self.score_log_scale = log_scale
        else:
            fixed = torch.zeros(()) if log_scale is None else log_scale.detach().clone()
            self.register_buffer("score_log_scale", fixed, persistent=False)

    @torch.jit.export
    def experts(
        self, profile: torch.Tensor, history: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """e_u, b_u, gate, and each expert's own normalised embedding (for distillation)."""
        profile_features = self.profile(profile)
        if self.expert_state.out_dim > 0:
            read = self.expert_state(state.index_select(1, self.expert_state_read))
            profile_features = torch.cat([profile_features, read], dim=1)
        e_cold = self.cold(profile_features)
        e_warm = self.warm(profile_features, self.pooling(self.item_inputs(history), history))
        gate = self.gate(state)
        bias = self.user_bias(torch.cat([profile, state], dim=1))
        if self.mix_scores:
            e_u, own_cold, own_warm = self._score_mixture(e_cold, e_warm, gate)
        else:
            e_u = gate[:, 0:1] * e_cold + gate[:, 1:2] * e_warm
            if self.normalized:
                e_u = F.normalize(e_u, dim=1)
            # The experts' own vectors stay normalised: distillation compares their directions.
            own_cold, own_warm = F.normalize(e_cold, dim=1), F.normalize(e_warm, dim=1)
        if self.state_items is not None:
            e_u, own_cold, own_warm = self._with_state_items(e_u, own_cold, own_warm, state)
        return e_u, bias, gate, own_cold, own_warm

    def _with_state_items(
        self, e_u: torch.Tensor, own_cold: torch.Tensor, own_warm: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g(state) / s appended to e_u (s · <g / s, v_i> = <g, v_i>); the experts' own vectors get
        zeros there, so that each still scores as that expert alone."""
        assert self.state_items is not None
        g = self.state_items(state) * torch.exp(-self.score_log_scale)
        zeros = torch.zeros_like(g)
        return (
            torch.cat([e_u, g], dim=1),
            torch.cat([own_cold, zeros], dim=1),
            torch.cat([own_warm, zeros], dim=1),
        )

    def _score_mixture(
        self, e_cold: torch.Tensor, e_warm: torch.Tensor, gate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """e_u = [w_cold · e_cold ; w_warm · e_warm]; each expert's own vector is its half of the
        concatenated space with zeros in the other half, so that against the concatenated item vectors
        it scores exactly as that expert alone (distillation compares those scores)."""
        if self.normalized:
            e_cold, e_warm = F.normalize(e_cold, dim=1), F.normalize(e_warm, dim=1)
        zeros = torch.zeros_like(e_cold)
        e_u = torch.cat([gate[:, 0:1] * e_cold, gate[:, 1:2] * e_warm], dim=1)
        return e_u, torch.cat([e_cold, zeros], dim=1), torch.cat([zeros, e_warm], dim=1)

    def forward(
        self, profile: torch.Tensor, history: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e_u, bias, gate, _, _ = self.experts(profile, history, state)
        return e_u, bias, gate


class ItemScorer(nn.Module):
    """Normalised e_i and b_i for catalog positions."""

    def __init__(
        self,
        encoder: FeatureEncoder,
        items: ItemSideInputs,
        config: ModelConfig,
        item_bias_columns: list[int],
    ) -> None:
        super().__init__()
        self.tower = item_tower_for(encoder, items, config)
        # With the experts' scores mixed, the warm expert ranks in an item space of its own.
        self.warm_tower = item_tower_for(encoder, items, config) if config.expert_mixing == "score" else None
        self.register_buffer("bias_candidates", item_bias_candidate_matrix(items))
        cardinalities = [int(c) + 1 for c in self.bias_candidates.max(dim=0).values.tolist()]
        self.item_bias = SideBias(
            item_bias_columns if config.use_bias_net else [],
            cardinalities,
            config.feature_dim,
            config.hidden_dim,
        )
        self.normalized = config.similarity == "cosine"
        # The items' side of the state term (UserTower.state_items is the users').
        self.state_items = item_state_term(encoder, items.n_items, config)

    @property
    def warm_item_tower(self) -> ItemTower:
        """The item tower the warm expert ranks against (and may embed its history with)."""
        return self.tower if self.warm_tower is None else self.warm_tower

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = self._normalized(self.tower(positions))
        if self.warm_tower is not None:
            vectors = torch.cat([vectors, self._normalized(self.warm_tower(positions))], dim=1)
        if self.state_items is not None:
            vectors = torch.cat([vectors, self.state_items(positions)], dim=1)
        return vectors, self.item_bias(self.bias_candidates[positions])

    def _normalized(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors, dim=1) if self.normalized else vectors


class ColdWarmNet(TwoTowerNet):
    def __init__(
        self,
        encoder: FeatureEncoder,
        config: ModelConfig,
        user_bias_columns: list[int] | None = None,
        item_bias_columns: list[int] | None = None,
    ) -> None:
        items = ItemSideInputs(encoder.item_features())
        cosine = config.similarity == "cosine"
        super().__init__(items.n_items, config.initial_scale if cosine else 1.0, learn_scale=cosine)
        self.config = config
        self.user_bias_columns = list(user_bias_columns or [])
        self.item_bias_columns = list(item_bias_columns or [])
        self.item_scorer = ItemScorer(encoder, items, config, self.item_bias_columns)
        self.user_tower = UserTower(
            encoder,
            items,
            config,
            self.user_bias_columns,
            self.item_scorer.warm_item_tower,
            self.log_scale,
        )

    def set_stage_popularity(self, table: torch.Tensor, without_own: torch.Tensor) -> None:
        """The (n_items, stages) columns of model/stage_popularity.py, with ``stage_popularity``."""
        self._stage_popularity().set_columns(table, without_own)

    def own_target_change(
        self, e_u: torch.Tensor, state: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor | None:
        """With stage popularity, each sample's target scored from the counts without the sample."""
        if not self.config.stage_popularity:
            return None
        term = self._stage_popularity()
        g_over_s = e_u[:, -term.width :]
        change = term.own_target_change(targets, state[:, COUNT_COLUMN])
        return self.scale * (g_over_s * change).sum(dim=1)

    def _stage_popularity(self) -> StagePopularity:
        term = self.item_scorer.state_items
        if not isinstance(term, StagePopularity):
            raise ValueError("this net has no stage popularity term (ModelConfig.stage_popularity)")
        return term
