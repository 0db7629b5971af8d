"""Configuration of the offline job: one pydantic model per concern, one settings root read from
``COLDWARM_``-prefixed environment variables (nested with ``__``, e.g. ``COLDWARM_TRAIN__EPOCHS=3``).

The feature, model and training configs are written into every manifest, so an artifact says how it
was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class FeatureConfig(BaseModel):
    """How raw user/item data becomes model inputs; shared by training and serving."""

    max_history: int = Field(50, ge=1, description="L: the most recent item ids kept as action features")
    zip_prefix_length: int = Field(
        2, ge=0, description="leading zip-code characters kept as a profile feature"
    )
    count_bounds: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000)
    days_bounds: tuple[float, ...] = (0.0, 1 / 24, 1.0, 3.0, 7.0, 14.0, 30.0, 90.0, 180.0, 365.0, 730.0)
    popularity_bounds: tuple[int, ...] = (0, 1, 3, 10, 30, 100, 300, 1000, 3000)
    year_bucket_size: int = Field(5, ge=1)
    min_state_samples: int = Field(
        100,
        ge=0,
        description="training samples a state bucket needs to be served as itself; rarer buckets are "
        "served as the nearest bucket that has them (0: every bucket as itself)",
    )


class ModelConfig(BaseModel):
    """Cold & Warm Net's shape; the use_* switches are the ablations."""

    embedding_dim: int = Field(64, ge=4)
    hidden_dim: int = Field(128, ge=4)
    feature_dim: int = Field(16, ge=2, description="width of each categorical feature embedding")
    n_user_groups: int = Field(32, ge=1, description="m: k-means user groups")
    bias_features: int = Field(10, ge=1, description="beta: features the bias net sees, chosen by MI")
    use_cold_expert: bool = True
    use_warm_expert: bool = True
    use_group_attention: bool = True
    use_bias_net: bool = True
    # Off by default: on MovieLens-1M (users 1-2,999) the model without distillation is better at cold
    # start (validation and test; README "Results"); COLDWARM_MODEL__USE_DKD=true turns it on.
    use_dkd: bool = False
    dkd_alpha: float = Field(0.05, ge=0.0)
    initial_scale: float = Field(10.0, gt=0.0, description="starting value of the learnable cosine scale")
    # The warm expert's reading of the history (model/nn/experts.py); README "Model and training choices".
    warm_pooling: Literal["mean", "attention"] = Field(
        "attention",
        description="mean: mean + learnt recency-weighted mean of the history; attention: mean + the "
        "newest position's output of causal self-attention blocks over the history",
    )
    warm_attention_blocks: int = Field(1, ge=1, description="self-attention blocks of warm_pooling=attention")
    warm_attention_dropout: float = Field(
        0.2, ge=0.0, lt=1.0, description="dropout of warm_pooling=attention while training"
    )
    warm_item_inputs: Literal["own", "item_tower"] = Field(
        "own",
        description="own: history items have their own id + genre embedding; item_tower: they are the "
        "item tower's vectors (shared with the targets, as in SASRec)",
    )
    expert_state_input: bool = Field(
        False,
        description="the experts also read the state features (count, days since first and last action), "
        "not only the gate: what a user in their first session picks differs from what the same "
        "profile picks later, and the additive biases cannot say so",
    )
    expert_state_columns: Literal["all", "count"] = Field(
        "all",
        description="with expert_state_input, which state features the experts read: all three, or the "
        "interaction count alone (where a user is in a sign-up flow, e.g. MovieLens's first page of "
        "five ratings), not the days since the first and last action",
    )
    warm_action_skip: bool = Field(
        False,
        description="the warm expert's output also adds the pooling's newest reading of the history "
        "directly (a residual past its MLPs), so the sequence signal reaches e_warm as SASRec's does",
    )
    warm_expert: Literal["mlp", "sequence"] = Field(
        "mlp",
        description="mlp: the paper's warm expert, MLPs over the profile and the pooled history, with "
        "group attention; sequence: SASRec's encoder is the warm expert (sasrec_blocks causal "
        "self-attention blocks over the history, its newest output is e_warm) plus an additive "
        "profile term, so that for users with a history the gate can weigh a SASRec-strength reading",
    )
    similarity: Literal["cosine", "dot"] = Field(
        "cosine",
        description="cosine: the paper's s·cos(e_u, e_i) with a learnt scale s; dot: the plain inner "
        "product <e_u, e_i> (as SASRec and YouTubeDNN score), so that a vector's norm can say how "
        "sure a user's reading is or how popular an item is",
    )
    state_item_dims: int = Field(
        0,
        ge=0,
        description="width of a term <g(state), v_i> added to every score: an item affinity that "
        "depends on the user's state (how many actions, since when), so that what newcomers choose "
        "first can differ from what everyone chooses; 0 leaves it out. Both vectors are appended to "
        "e_u (as g / s, so that the learnt scale s does not scale the term) and e_i, so the score "
        "stays one inner product",
    )
    stage_popularity: bool = Field(
        False,
        description="add a term <g(state), p_i>, p_i the item's stage popularity "
        "(model/stage_popularity.py: per interaction-count bucket, how often train users at that stage "
        "chose it next, counted, not learnt) and g(state) learnt: what users at this stage choose, "
        "weighed by the user's state; appended to e_u and e_i like state_item_dims, which it excludes",
    )
    stage_popularity_from: int = Field(
        20,
        ge=1,
        description="the narrowest stage popularity column counts the first this many actions of "
        "each train user (the count bucket holding this number less one); narrower ones learn the "
        "order of actions taken at the same moment (MovieLens orders same-second ratings by item id): "
        "20 is onboarding-popular's N chosen on validation users",
    )
    # Score mixing with a warm phase (TrainConfig.warm_phase_epochs) measured best over three
    # validation seeds (README "Model and training choices"); embedding is the paper's form.
    expert_mixing: Literal["embedding", "score"] = Field(
        "score",
        description="embedding: the paper's e_u = w_cold·e_cold + w_warm·e_warm against one item tower; "
        "score: each expert has its own item tower and the gate mixes the two experts' scores, "
        "w_cold·s(e_cold, e_i^cold) + w_warm·s(e_warm, e_i^warm), still one inner product of the "
        "concatenated vectors (2 × embedding_dim), so that the cold and the warm side each learn the "
        "item space they rank in",
    )
    dkd_scope: Literal["all", "cold_start"] = Field(
        "all", description="samples DKD may distil: every sample, or only those with a cold-start history"
    )
    # The SASRec baseline's transformer (model/baselines/sasrec.py); Kang & McAuley's ML-1M settings.
    sasrec_blocks: int = Field(2, ge=1, description="causal self-attention blocks of the SASRec baseline")
    sasrec_heads: int = Field(1, ge=1, description="attention heads; must divide embedding_dim")
    sasrec_dropout: float = Field(0.2, ge=0.0, lt=1.0, description="SASRec dropout while training")

    @model_validator(mode="after")
    def _one_state_term(self) -> ModelConfig:
        if self.stage_popularity and self.state_item_dims:
            raise ValueError("stage_popularity and state_item_dims are two forms of one term: set one")
        return self


class TrainConfig(BaseModel):
    loss: Literal["bce", "sampled_softmax"] = "sampled_softmax"
    negatives: int = Field(4, ge=1, description="uniform random negatives per positive (bce)")
    shared_negatives: int = Field(
        1024,
        ge=0,
        description="uniform negatives shared by the batch, besides in-batch ones (sampled_softmax)",
    )
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(1024, ge=8)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    patience: int = Field(2, ge=0, description="epochs without a better validation figure before stopping")
    validation_group: str = "cold_start"
    validation_metric: str = "recall@50"
    pretrain_epochs: int = Field(
        2, ge=1, description="epochs of the warm-only model whose users k-means groups"
    )
    active_users: int = Field(1000, ge=1, description="most active train users clustered into groups")
    session_start_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="share of training samples asked for at the start of a later session (request time "
        "moved to the last action + a gap) instead of at the moment of the next interaction",
    )
    session_start_from: int = Field(
        1, ge=1, description="history length from which a sample may be moved to a later session start"
    )
    session_gap_s: float = Field(1800.0, gt=0, description="a pause this long starts a new session")
    long_gap_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="of the moved samples, the share whose gap is log-uniform up to max_gap_days instead "
        "of one of the data's own session-start gaps",
    )
    max_gap_days: float = Field(3650.0, gt=0, description="longest gap a moved sample is given")
    same_moment_order: Literal["data", "shuffled"] = Field(
        "data",
        description="the order in which training reads a user's actions of one timestamp: the data's "
        "(MovieLens: by item id, which next-item targets then teach) or shuffled once (seeded), as "
        "actions of one moment have none; evaluation keeps the protocol's order either way",
    )
    history_balance: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="each sample's loss is weighted by (share of samples with its history length, capped "
        "at max_history) ^ -history_balance, normalised to mean 1: 0 weighs every sample alike, 1 gives "
        "every history length the same total weight (short histories are rare among prefix samples)",
    )
    target_window: int = Field(
        1,
        ge=1,
        description="a prefix with fewer than target_window_until actions is trained towards each of "
        "its next target_window actions, one sample per target (1: the next action only). The "
        "protocol asks for the next 10, and a new user's next one alone is noisy: actions of one "
        "moment have no order, and MovieLens orders a sign-up's same-second ratings by item id",
    )
    target_window_until: int = Field(
        10, ge=1, description="the prefixes shorter than this many actions get target_window targets"
    )
    target_window_mode: Literal["prefix", "target", "draw"] = Field(
        "prefix",
        description="prefix: a copy of the prefix's sample per target, the copies sharing one sample's "
        "weight, so only what its targets are changes; target: each copy weighs as a sample of its "
        "own, so short prefixes also weigh more; draw: no copies, the prefix's one sample is trained "
        "towards a target drawn (seeded) from its window, the prefix weighting's loss in expectation "
        "at the cost of one sample",
    )
    warm_phase_epochs: int = Field(
        8,
        ge=0,
        description="Cold & Warm Net only: after the main loop (stopped on validation_group), up to this "
        "many epochs that train the warm side alone (its history reading, the warm expert, its item "
        "tower under expert_mixing=score, and the gate), the cold side frozen where the main loop "
        "left it, stopped on warm_phase_validation_group: the cold expert peaks epochs before the "
        "warm one, and one stopping point serves one of them",
    )
    warm_phase_validation_group: str = "all"
    warm_phase_validation_metric: str = "ndcg@50"
    seed: int = 0
    torch_threads: int = Field(0, ge=0, description="0 keeps torch's default")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where training runs: auto is CUDA when torch sees a GPU, else the CPU"
    )


class ExportConfig(BaseModel):
    compiled_tower: Literal["auto", "off"] = Field(
        "auto",
        description="auto: also compile the user tower into AOTInductor packages (CPU, and CUDA when "
        "present) when a C++ compiler is present; servers use them when they match (model/compiled_tower.py)",
    )


class DistributedConfig(BaseModel):
    """Training with several processes (torchrun); the layout itself comes from torchrun's variables."""

    timeout_s: float = Field(
        1800.0,
        gt=0,
        description="longest wait of one process on another (the others wait while rank 0 validates)",
    )


RecipeName = Literal["auto", "next_action", "batched_starts"]
# What the batched_starts recipe sets, each field only where the settings leave it unset: the count in
# the experts and a window of ten targets for the first ten actions' prefixes, which measured better
# on data whose first actions come in same-second batches (README "The count in the experts, with a
# target window"). next_action sets nothing: the fields' own defaults.
BATCHED_STARTS_RECIPE: dict[str, dict[str, object]] = {
    "model": {"expert_state_input": True, "expert_state_columns": "count"},
    "train": {"target_window": 10},
}


class Settings(BaseSettings):
    """Root of the offline job's configuration."""

    model_config = SettingsConfigDict(env_prefix="COLDWARM_", env_nested_delimiter="__", extra="ignore")

    data: str = Field(
        "synthetic",
        description="synthetic[:N_USERS], a MovieLens-1M directory, a directory of Parquet interactions "
        "files or an interactions file",
    )
    artifacts_dir: Path = Path("artifacts")
    cache_dir: Path = Path("cache")
    features: FeatureConfig = FeatureConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    distributed: DistributedConfig = DistributedConfig()
    recipe: RecipeName = Field(
        "auto",
        description="auto: batched_starts where the train users' first actions come in same-second "
        "batches (model/recipe.py), else next_action; next_action: the fields' defaults, each prefix "
        "trained towards its next action; batched_starts: BATCHED_STARTS_RECIPE for the fields left unset",
    )
