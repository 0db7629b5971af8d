"""Stage popularity: how often each item was the next choice of train users at each stage of their life
with the service, the stage being the interaction-count bucket of their state.

What a user picks first is not what everyone picks: MovieLens asks a newcomer to rate a chosen set of
films, and a feed shows newcomers its onboarding slate. A global item bias cannot say so, and a learnt
per-item vector weighed by the state (``ModelConfig.state_item_dims``) ranked validation newcomers
worse, not better (README "Onboarding popularity, and a state term"). This table is counted, not
learnt, and the model learns only how much each column weighs for a user in a given state
(``ModelConfig.stage_popularity``).

Column c counts, per item, the training samples of count bucket c or earlier whose target it is: one
bucket alone is too few samples (a bucket of one action count holds one sample per train user). The
narrowest column counts each train user's first ``ModelConfig.stage_popularity_from`` actions: on
MovieLens, same-second ratings are ordered by item id, and narrower columns taught the model that
order (validation newcomers ranked worse, 0.27 Recall@50 against the default's 0.32 after three
epochs), while "the first 20 actions" ranks them as well as onboarding-popular does. The columns are
log(1 + count), standardised over the catalog.

A training sample must not find its own answer in the table: counted with it, its target is one
count more popular than any other item as often chosen, which in the sparse early columns is most of
what tells a rare item apart, and the model learns to trust the table more than it deserves (on
validation newcomers that ranked worse than the default, not better). So the table comes with its
counts less the sample's own (``without_own``), and training scores a sample's target from those in
the columns that counted it (``ColdWarmNet.own_target_change``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.features import COUNT_COLUMN
from model.samples import TrainingSamples


@dataclass(frozen=True)
class StageColumns:
    """(n_items, n_stages) float32 each: the table, and the same columns with one count less, on the
    table's scale (what an item's columns are to a sample that chose it)."""

    counted: np.ndarray
    without_own: np.ndarray


def stage_popularity_columns(samples: TrainingSamples, stages: range, n_items: int) -> StageColumns:
    """Per count bucket c of ``stages``: the standardised log(1 + count) of the targets of the samples
    in bucket c or earlier; 0 where the counts do not differ between items."""
    sample_stages = samples.state[:, COUNT_COLUMN].long().numpy()
    counts = np.zeros((stages.stop, n_items), dtype=np.float64)
    np.add.at(counts, (sample_stages, samples.target.numpy()), 1.0)
    cumulative = np.cumsum(counts, axis=0)[stages.start :]
    logs = np.log1p(cumulative)
    mean, std = logs.mean(axis=1, keepdims=True), logs.std(axis=1, keepdims=True)
    flat = std == 0
    scale = np.where(flat, 1.0, std)

    def standardised(values: np.ndarray) -> np.ndarray:
        return np.where(flat, 0.0, (values - mean) / scale).T.astype(np.float32)

    return StageColumns(standardised(logs), standardised(np.log1p(np.maximum(cumulative - 1.0, 0.0))))
