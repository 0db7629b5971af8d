"""A MovieLens-shaped synthetic data set in which the user profile really predicts taste.

Cold-start recommendation is only testable if a new user's profile carries signal, so taste is built
from the profile: each gender and each age bracket adds a latent direction, their sum is the segment's
taste, and a user is the segment taste plus a smaller occupation offset plus personal noise. Items get
latent vectors from their genres, so segment tastes show up as segment genre preferences.

The sequence model copies three MovieLens habits: Zipf-like item popularity, first interactions that
lean towards popular items (the onboarding page shows blockbusters), and sequential locality (the next
item tends to resemble the previous one). Choices are made for all users at once, one step at a time,
with the Gumbel-max trick over the not-yet-seen items, so 600 users take milliseconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from model.data.schema import GENRE_SEPARATOR, InteractionData, make_interaction_data

GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# Roughly the share of ML-1M movies carrying each genre, so common genres stay common.
_GENRE_WEIGHTS = np.array(
    [503, 283, 105, 251, 1200, 211, 127, 1603, 68, 44, 343, 114, 106, 471, 276, 492, 143, 68.0]
)
AGES: tuple[str, ...] = ("1", "18", "25", "35", "45", "50", "56")
_AGE_WEIGHTS = np.array([222, 1103, 2096, 1193, 550, 496, 380.0])  # ML-1M's age brackets
GENDERS: tuple[str, ...] = ("M", "F")
_GENDER_WEIGHTS = np.array([4331, 1709.0])
N_OCCUPATIONS = 21

LATENT_DIM = 16
FIRST_TIMESTAMP = 956_703_932  # the earliest ML-1M rating (2000-04-25)
_TIME_SPAN_S = 3 * 365 * 24 * 3600

# Strengths of the choice model's terms; chosen so that taste, popularity and locality all matter.
_TASTE_WEIGHT = 2.0
_POPULARITY_LATE = 0.4  # weight of log-popularity once a user is settled ...
_POPULARITY_EARLY = 1.6  # ... plus this much extra at the first interaction, decaying:
_POPULARITY_DECAY_STEPS = 8.0
_LOCALITY_WEIGHT = 2.0
_ZIPF_EXPONENT = 1.0
_USER_BLOCK = 4096  # users processed together; bounds the (users x items) working arrays


def generate_synthetic(
    n_users: int = 600,
    n_items: int = 300,
    interactions_per_user: tuple[int, int] = (5, 120),
    seed: int = 0,
) -> InteractionData:
    """Users 1..n_users, items 1..n_items, ratings 1-5; the same seed gives the same data."""
    low, high = interactions_per_user
    if n_users < 1 or n_items < 1 or not 1 <= low <= high:
        raise ValueError(
            f"need n_users, n_items >= 1 and 1 <= low <= high, got {n_users}, {n_items}, {low}, {high}"
        )
    high, low = min(high, n_items), min(low, n_items)
    rng = np.random.default_rng(seed)

    genre_vectors = rng.normal(size=(len(GENRES), LATENT_DIM)) / np.sqrt(LATENT_DIM) * 2.0
    items, item_genres = _make_items(rng, n_items)
    item_vectors = _item_vectors(rng, item_genres, genre_vectors)
    users, user_vectors = _make_users(rng, n_users)
    log_popularity = _zipf_log_popularity(rng, n_items)
    lengths = _sequence_lengths(rng, n_users, low, high)

    chosen = np.full((n_users, high), -1, dtype=np.int64)
    for start in range(0, n_users, _USER_BLOCK):
        block = slice(start, min(start + _USER_BLOCK, n_users))
        chosen[block] = _choose_sequences(
            rng, user_vectors[block], item_vectors, log_popularity, lengths[block], high
        )

    interactions = _interaction_table(rng, chosen, lengths, user_vectors, item_vectors)
    name = f"synthetic:{n_users}" + (f":seed{seed}" if seed else "")
    return make_interaction_data(interactions, users, items, name)


def _make_items(rng: np.random.Generator, n_items: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The item table and a (items x genres) 0/1 matrix; 1-3 genres each, drawn by genre frequency."""
    membership = np.zeros((n_items, len(GENRES)), dtype=bool)
    counts = rng.choice([1, 2, 3], size=n_items, p=[0.5, 0.35, 0.15])
    genre_p = _GENRE_WEIGHTS / _GENRE_WEIGHTS.sum()
    for index, count in enumerate(counts):
        membership[index, rng.choice(len(GENRES), size=count, replace=False, p=genre_p)] = True
    # Skewed towards recent years like MovieLens, within 1920-2000.
    years = np.clip(np.round(2000 - rng.exponential(12.0, size=n_items)), 1920, 2000).astype(np.int64)
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    genre_names = np.array(GENRES)
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"Synthetic Movie {i} ({y})" for i, y in zip(ids, years, strict=True)],
            "genres": [GENRE_SEPARATOR.join(genre_names[row]) for row in membership],
            "year": years,
        }
    )
    return items, membership


def _item_vectors(rng: np.random.Generator, membership: np.ndarray, genre_vectors: np.ndarray) -> np.ndarray:
    """Mean of the item's genre vectors plus item-specific noise: genre-correlated, not genre-determined."""
    genre_part = membership @ genre_vectors / membership.sum(axis=1, keepdims=True)
    return genre_part + rng.normal(scale=0.35, size=genre_part.shape)


def _make_users(rng: np.random.Generator, n_users: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Profiles and taste vectors; taste = gender + age direction + occupation offset + personal noise."""
    gender_dirs = rng.normal(size=(len(GENDERS), LATENT_DIM))
    age_dirs = rng.normal(size=(len(AGES), LATENT_DIM))
    occupation_dirs = rng.normal(scale=0.4, size=(N_OCCUPATIONS, LATENT_DIM))

    gender = rng.choice(len(GENDERS), size=n_users, p=_GENDER_WEIGHTS / _GENDER_WEIGHTS.sum())
    age = rng.choice(len(AGES), size=n_users, p=_AGE_WEIGHTS / _AGE_WEIGHTS.sum())
    occupation = rng.integers(0, N_OCCUPATIONS, size=n_users)
    zip_codes = rng.integers(0, 100_000, size=n_users)

    taste = gender_dirs[gender] + age_dirs[age] + occupation_dirs[occupation]
    taste += rng.normal(scale=0.7, size=taste.shape)
    taste /= np.linalg.norm(taste, axis=1, keepdims=True)
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1, dtype=np.int64),
            "gender": np.array(GENDERS)[gender],
            "age": np.array(AGES)[age],
            "occupation": occupation.astype(str),
            "zip_code": [f"{z:05d}" for z in zip_codes],
        }
    )
    return users, taste


def _zipf_log_popularity(rng: np.random.Generator, n_items: int) -> np.ndarray:
    """log of a Zipf weight per item; ranks shuffled so popularity is unrelated to the item id."""
    ranks = rng.permutation(n_items) + 1
    return -_ZIPF_EXPONENT * np.log(ranks)


def _sequence_lengths(rng: np.random.Generator, n_users: int, low: int, high: int) -> np.ndarray:
    """Log-uniform between low and high: many light users, a long tail of heavy ones."""
    lengths = np.exp(rng.uniform(np.log(low), np.log(high + 1), size=n_users))
    return np.clip(np.floor(lengths), low, high).astype(np.int64)


def _choose_sequences(
    rng: np.random.Generator,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    log_popularity: np.ndarray,
    lengths: np.ndarray,
    n_steps: int,
) -> np.ndarray:
    """Item indices per user and step (-1 past a user's length), sampled without repeats."""
    n_users, n_items = len(user_vectors), len(item_vectors)
    unit_items = item_vectors / np.linalg.norm(item_vectors, axis=1, keepdims=True)
    affinity = user_vectors @ unit_items.T
    # Standardised per user, so the taste term has the same strength for every user.
    taste = (affinity - affinity.mean(axis=1, keepdims=True)) / (affinity.std(axis=1, keepdims=True) + 1e-9)
    similarity = _LOCALITY_WEIGHT * (unit_items @ unit_items.T)

    chosen = np.full((n_users, n_steps), -1, dtype=np.int64)
    seen = np.zeros((n_users, n_items), dtype=bool)
    for step in range(int(lengths.max())):
        active = np.flatnonzero(lengths > step)  # only users still going cost anything
        popularity_weight = _POPULARITY_LATE + _POPULARITY_EARLY * np.exp(-step / _POPULARITY_DECAY_STEPS)
        logits = _TASTE_WEIGHT * taste[active] + popularity_weight * log_popularity
        logits += rng.gumbel(size=logits.shape)
        if step:
            logits += similarity[chosen[active, step - 1]]
        logits[seen[active]] = -np.inf
        pick = logits.argmax(axis=1)
        chosen[active, step] = pick
        seen[active, pick] = True
    return chosen


def _interaction_table(
    rng: np.random.Generator,
    chosen: np.ndarray,
    lengths: np.ndarray,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
) -> pd.DataFrame:
    """Flattens the choices; timestamps strictly increase per user, ratings follow taste (1-5)."""
    user_index, step = np.nonzero(chosen >= 0)
    item_index = chosen[user_index, step]
    n = len(user_index)

    starts = FIRST_TIMESTAMP + rng.integers(0, _TIME_SPAN_S, size=len(lengths))
    gaps = 1 + rng.geometric(1 / 600, size=n)  # minutes-apart sessions; at least 1 s so order is strict
    offsets = np.cumsum(gaps)
    first_of_user = np.r_[0, np.cumsum(lengths)[:-1]]
    offsets -= np.repeat(offsets[first_of_user] - gaps[first_of_user], lengths)  # restart per user

    affinity = np.einsum("ij,ij->i", user_vectors[user_index], item_vectors[item_index])
    z = (affinity - affinity.mean()) / (affinity.std() + 1e-9)
    rating = np.clip(np.round(3.6 + 0.9 * z + rng.normal(scale=0.7, size=n)), 1, 5)
    return pd.DataFrame(
        {
            "user_id": user_index.astype(np.int64) + 1,
            "item_id": item_index + 1,
            "timestamp": starts[user_index] + offsets,
            "rating": rating.astype(np.float32),
        }
    )
