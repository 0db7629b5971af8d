"""Prefix training samples: for user u and position t, history = items before t, target = item t,
state as of the sample's request time. Encoded once, through the same FeatureEncoder the service uses;
a sample's history is gathered from its user's encoded sequence when its batch is built
(``TrainingSamples``), so memory grows with the interactions, not with samples x max_history.

The request time of most samples is item t's own timestamp, as in the evaluation protocol; there,
the previous action was mostly seconds earlier. A feed request instead usually opens a session after a
pause of hours to years, so a share of the samples is asked for at the start of a later session:
the last action's time plus a gap (``session_start_times``). Without them the state features of a
returning user fall into buckets training never saw, and the gate treats them as new.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from model.features import (
    MISSING,
    SECONDS_PER_DAY,
    STATE_COLUMNS,
    FeatureEncoder,
    RawUsers,
    profile_arrays,
)
from model.settings import TrainConfig

# The TrainConfig fields that shape the samples: what ``build_training_samples`` and
# ``TrainingContext.build`` read. The seed aside: the training seeds of one experiment share one draw.
SAMPLE_FIELDS: tuple[str, ...] = (
    "same_moment_order",
    "session_start_share",
    "session_start_from",
    "session_gap_s",
    "long_gap_share",
    "max_gap_days",
    "target_window",
    "target_window_until",
    "target_window_mode",
)


@dataclass
class UserSequences:
    """Chronological interactions of some users, flattened with per-user offsets."""

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray

    @classmethod
    def from_interactions(cls, interactions: pd.DataFrame, user_ids: np.ndarray) -> UserSequences:
        # Column by column, not a copy of the selected rows: only these three columns are kept.
        selected = interactions["user_id"].isin(user_ids).to_numpy()  # rows are (user, time, item) sorted

        def column(name: str) -> np.ndarray:
            return interactions[name].to_numpy(np.int64)[selected]

        users, counts = np.unique(column("user_id"), return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(users, offsets, column("item_id"), column("timestamp"))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def same_moment_shuffled(self, rng: np.random.Generator) -> UserSequences:
        """The same sequences with each user's actions of one timestamp in a random order.

        Actions logged at the same moment have no order, but the data gives them one (MovieLens: by
        item id), and a model trained on next-item targets learns it: a new user's first target is
        then the lowest id of their first second's ratings, which the next ten (what the protocol
        asks for) are not."""
        rows = np.repeat(np.arange(len(self.user_ids)), self.lengths())
        order = np.lexsort((rng.random(len(self.items)), self.timestamps, rows))
        return UserSequences(self.user_ids, self.offsets, self.items[order], self.timestamps[order])

    def gaps(self) -> np.ndarray:
        """Seconds between consecutive interactions of the same user."""
        same_user = np.ones(len(self.items), dtype=bool)
        same_user[self.offsets[:-1]] = False
        return np.diff(self.timestamps)[same_user[1:]] if len(self.items) else np.zeros(0, np.int64)


def session_start_gaps(sequences: UserSequences, session_gap_s: float) -> np.ndarray:
    """The pauses after which users of the data came back: gaps of at least ``session_gap_s``."""
    gaps = sequences.gaps()
    return gaps[gaps >= session_gap_s].astype(np.float64)


def draw_gaps(rng: np.random.Generator, n: int, data_gaps: np.ndarray, config: TrainConfig) -> np.ndarray:
    """``n`` pauses in seconds: the data's own session-start gaps, and a log-uniform share up to
    ``max_gap_days``, so that returns after longer pauses than the data holds are seen too."""
    longest = max(config.max_gap_days * SECONDS_PER_DAY, config.session_gap_s)
    long_tail = rng.random(n) < (config.long_gap_share if len(data_gaps) else 1.0)
    gaps = np.exp(rng.uniform(np.log(config.session_gap_s), np.log(longest), size=n))
    if len(data_gaps):
        gaps[~long_tail] = rng.choice(data_gaps, size=int((~long_tail).sum()))
    return gaps


def session_start_times(
    sequences: UserSequences,
    user_rows: np.ndarray,
    positions: np.ndarray,
    config: TrainConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Request time of each sample: its target's timestamp, or for a ``session_start_share`` of the
    samples with at least ``session_start_from`` actions, the last action's time plus a drawn pause."""
    flat = sequences.offsets[user_rows] + positions
    now = sequences.timestamps[flat].astype(np.int64)
    moved = (positions >= config.session_start_from) & (
        rng.random(len(positions)) < config.session_start_share
    )
    if moved.any():
        data_gaps = session_start_gaps(sequences, config.session_gap_s)
        gaps = draw_gaps(rng, int(moved.sum()), data_gaps, config)
        now[moved] = sequences.timestamps[flat[moved] - 1] + np.round(gaps).astype(np.int64)
    return now


def prefix_states(
    sequences: UserSequences, user_rows: np.ndarray, positions: np.ndarray, now: np.ndarray
) -> RawUsers:
    """Users ``user_rows`` as of their ``positions``-th interaction (that interaction not included),
    asked at ``now``: their counts and times only, all that ``FeatureEncoder.encode_state`` reads
    (profiles are encoded per user, histories gathered per batch: ``TrainingSamples``)."""
    base = sequences.offsets[user_rows]
    seen = positions > 0
    first = np.where(seen, sequences.timestamps[base], 0)
    last = np.where(seen, sequences.timestamps[np.maximum(base + positions - 1, 0)], 0)
    no_history = np.zeros((len(user_rows), 0), dtype=np.int64)
    return RawUsers({}, no_history, positions.astype(np.int64), first, last, now)


@dataclass
class TrainingSamples:
    """Prefix samples: sample i is user row ``user_row[i]`` before their ``position[i]``-th interaction,
    in state ``state[i]``, and its target is that interaction's item (catalog position ``target[i]``),
    or under a target window (``target_windows``) a later one. Samples are grouped by user row, in
    position order.

    What a sample's history is (the user's ``max_history`` items before ``position``, newest first, as
    history codes) is not stored per sample but gathered when a batch is built: the users' whole
    sequences are kept once as codes (``sequence_codes``, int32, with per-user-row
    ``sequence_offsets``), and ``histories`` reads each sample's window from them. A stored
    (samples x max_history) matrix costs 4 * max_history bytes per sample, several times everything
    else; this way a sample costs 23 bytes, plus 4 per interaction of the users' sequences.
    Profiles are per user, not per sample, for the same reason.
    """

    user_profile: torch.Tensor  # (users, len(PROFILE_COLUMNS)) int64, by user row
    sequence_codes: torch.Tensor  # (interactions,) int32: FeatureEncoder.history_codes of each item
    sequence_offsets: torch.Tensor  # (users + 1,) int64: user row r's codes are [offsets[r], offsets[r+1])
    user_row: np.ndarray  # (samples,) int64
    position: torch.Tensor  # (samples,) int32
    state: torch.Tensor  # (samples, len(STATE_COLUMNS)), the smallest integer dtype that holds the codes
    target: torch.Tensor  # (samples,) int64
    max_history: int
    # (samples,) float32 mean 1, or None (all alike): the target window's weights (``target_windows``)
    window_weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(profile, history, state, target) of samples ``index``, int64 as the model takes them."""
        return (self.profiles(index), self.histories(index), self.state[index].long(), self.target[index])

    def profiles(self, index: torch.Tensor) -> torch.Tensor:
        return self.user_profile[torch.from_numpy(self.user_row)[index]]

    def histories(self, index: torch.Tensor) -> torch.Tensor:
        """(len(index), max_history) int64: what ``FeatureEncoder.encode_history`` makes of each
        sample's raw prefix (newest first; items outside the catalog dropped and the rest moved left;
        0-padded)."""
        rows = torch.from_numpy(self.user_row)[index]
        position = self.position[index].long()
        back = torch.arange(self.max_history)
        newest = self.sequence_offsets[rows] + position - 1
        flat = (newest[:, None] - back[None, :]).clamp_(min=0)
        codes = torch.where(back[None, :] < position[:, None], self.sequence_codes[flat], MISSING)
        padding = codes == MISSING
        # Only an item outside the catalog leaves a hole before the end of a row; training data from the
        # encoder's own catalog has none, so the sort is mostly skipped.
        if (padding[:, :-1] & ~padding[:, 1:]).any():
            order = torch.sort(padding.to(torch.uint8), dim=1, stable=True).indices
            codes = codes.gather(1, order)
        return codes.long()

    def history_lengths(self) -> torch.Tensor:
        """Each sample's number of known history items (``history_lengths`` of its gathered history),
        counted from the codes without gathering."""
        known = torch.zeros(len(self.sequence_codes) + 1, dtype=torch.long)
        torch.cumsum(self.sequence_codes != MISSING, dim=0, out=known[1:])
        position = self.position.long()
        end = self.sequence_offsets[torch.from_numpy(self.user_row)] + position
        return known[end] - known[end - position.clamp(max=self.max_history)]

    @property
    def profile(self) -> torch.Tensor:
        """Every sample's profile, (samples, 4): a copy per sample, for inspection; batches use ``batch``."""
        return self.profiles(torch.arange(len(self)))

    @property
    def history(self) -> torch.Tensor:
        """Every sample's history, (samples, max_history) int64: the matrix the samples do not store,
        for inspection and small data; training gathers it per batch (``batch``)."""
        return self.histories(torch.arange(len(self)))


@dataclass(frozen=True)
class TargetWindows:
    """Samples added for a target window: extra sample j copies sample ``source[j]`` (its user,
    position and request time) and is trained towards ``target[j]``, a later action of its user."""

    source: np.ndarray  # (extra,) int64, into the one-target samples
    target: np.ndarray  # (extra,) int64 catalog positions


def target_windows(
    sequences: UserSequences,
    catalog_targets: np.ndarray,
    user_rows: np.ndarray,
    positions: np.ndarray,
    config: TrainConfig,
) -> TargetWindows:
    """For each sample whose prefix is shorter than ``target_window_until``, one sample towards each
    of the 2nd..``target_window``-th actions after the prefix that the sequence holds and the catalog
    knows (``catalog_targets``: each interaction's catalog position, -1 outside it)."""
    short = np.flatnonzero(positions < config.target_window_until)
    ahead = np.arange(1, config.target_window)
    source = np.repeat(short, len(ahead))
    step = np.tile(ahead, len(short))
    inside = positions[source] + step < sequences.lengths()[user_rows[source]]
    source, step = source[inside], step[inside]
    target = catalog_targets[sequences.offsets[user_rows[source]] + positions[source] + step]
    known = target >= 0
    return TargetWindows(source[known], target[known])


def drawn_targets(targets: np.ndarray, windows: TargetWindows, rng: np.random.Generator) -> np.ndarray:
    """Each sample's target drawn uniformly from its own (``targets``) and its window's."""
    extra = np.bincount(windows.source, minlength=len(targets))
    pick = np.floor(rng.random(len(targets)) * (1 + extra)).astype(np.int64)  # 0: its own target
    first_extra = np.concatenate([[0], np.cumsum(extra)[:-1]])  # windows.source is sorted
    drawn = targets.copy()
    moved = pick > 0
    drawn[moved] = windows.target[first_extra[moved] + pick[moved] - 1]
    return drawn


def window_weights(n_samples: int, windows: TargetWindows, mode: str) -> np.ndarray | None:
    """Weights (mean 1) of the ``n_samples`` one-target samples followed by the window's: under
    ``prefix`` the samples of one prefix share one weight, under ``target`` all weigh alike (None)."""
    if mode != "prefix" or not len(windows.source):
        return None
    per_prefix = 1 + np.bincount(windows.source, minlength=n_samples)
    weights = 1.0 / per_prefix[np.concatenate([np.arange(n_samples), windows.source])]
    return (weights / weights.mean()).astype(np.float32)


def sample_weights(samples: TrainingSamples, history_balance: float) -> torch.Tensor | None:
    """Each sample's loss weight (mean 1), or None when all weigh alike: the target window's weights
    times ``history_balance_weights``."""
    weights = samples.window_weight
    if history_balance:
        balance = history_balance_weights(samples, history_balance)
        weights = balance if weights is None else weights * balance
    return None if weights is None else weights / weights.mean()


def history_lengths(history: torch.Tensor) -> torch.Tensor:
    """Items in each row of encoded histories (0 = padding), capped at the encoder's max_history."""
    return (history > 0).sum(dim=1)


def history_balance_weights(samples: TrainingSamples, balance: float) -> torch.Tensor:
    """Per-sample loss weights (mean 1): (share of samples with the same capped history length) ^
    -balance. Prefix samples are mostly long histories, so without it the first few actions, where
    a new user is judged, are a few percent of the loss."""
    return length_balance_weights(samples.history_lengths(), balance)


def length_balance_weights(lengths: torch.Tensor, balance: float) -> torch.Tensor:
    """``history_balance_weights`` for given history lengths."""
    counts = torch.bincount(lengths).double()
    weights = (counts[lengths] / len(lengths)).pow(-balance)
    return (weights / weights.mean()).float()


def build_training_samples(
    data_users: pd.DataFrame,
    sequences: UserSequences,
    encoder: FeatureEncoder,
    config: TrainConfig | None = None,
    chunk_size: int = 65_536,
) -> TrainingSamples:
    """Every prefix of every sequence whose target is in the catalog, at the request times of
    ``session_start_times`` (seeded by ``config.seed``); ``config`` None gives the plain prefix
    samples: each at its target's time, towards its next action only. States are encoded
    ``chunk_size`` samples at a time, bounding the float64 intermediates of ``encode_state``."""
    lengths = sequences.lengths()
    user_rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    positions = np.arange(len(user_rows)) - sequences.offsets[user_rows]
    catalog_targets = encoder.catalog_positions(sequences.items)
    keep = catalog_targets >= 0
    user_rows, positions, targets = user_rows[keep], positions[keep], catalog_targets[keep]
    del keep
    config = config or TrainConfig(session_start_share=0.0, target_window=1)
    windows = target_windows(sequences, catalog_targets, user_rows, positions, config)
    if config.target_window_mode == "draw":
        rng = np.random.default_rng([config.seed, 1])
        targets, windows = (
            drawn_targets(targets, windows, rng),
            TargetWindows(windows.source[:0], windows.target[:0]),
        )
    now = session_start_times(sequences, user_rows, positions, config, np.random.default_rng(config.seed))
    state = np.empty((len(user_rows), len(STATE_COLUMNS)), dtype=state_dtype(encoder))
    for start in range(0, len(user_rows), chunk_size):
        chunk = slice(start, start + chunk_size)
        state[chunk] = encoder.encode_state(
            prefix_states(sequences, user_rows[chunk], positions[chunk], now[chunk])
        )
    del now
    weights = window_weights(len(user_rows), windows, config.target_window_mode)
    if len(windows.source):
        # The window's samples are copies of their prefix's sample with another target, placed beside
        # it: samples stay grouped by user in position order (user groups and the MI sample read them so).
        rows = np.concatenate([np.arange(len(user_rows)), windows.source])
        order = np.lexsort((positions[rows], user_rows[rows]))
        rows = rows[order]
        user_rows, positions, state = user_rows[rows], positions[rows], state[rows]
        targets = np.concatenate([targets, windows.target])[order]
        weights = None if weights is None else weights[order]
    profiles = profile_arrays(data_users, sequences.user_ids)
    return TrainingSamples(
        user_profile=torch.as_tensor(encoder.encode_profiles(profiles, len(sequences.user_ids))),
        sequence_codes=torch.as_tensor(encoder.history_codes(sequences.items).astype(np.int32)),
        sequence_offsets=torch.as_tensor(sequences.offsets, dtype=torch.long),
        user_row=user_rows,
        position=torch.as_tensor(positions.astype(np.int32)),
        state=torch.as_tensor(state),
        target=torch.as_tensor(targets, dtype=torch.long),
        max_history=encoder.config.max_history,
        window_weight=None if weights is None else torch.from_numpy(weights),
    )


def state_dtype(encoder: FeatureEncoder) -> np.dtype:
    """The smallest signed integer dtype (torch has no unsigned 16 or 32) that holds every state code."""
    largest = max(encoder.state_cardinalities()) - 1
    return next(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64) if largest <= np.iinfo(t).max)
