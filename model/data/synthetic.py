"""A MovieLens-shaped synthetic data set with the structure real feeds have.

The generative story, in the order the generator follows it (the strengths are the module constants):

1. **Taste depends on the profile.** Each gender and each age bracket adds a latent direction, and so
   does each occupation; a user's stable taste is their sum plus personal noise. Items get latent
   vectors from their genres plus a little item noise, so the item side features say where an item
   sits and a new user's profile says what they will like.
2. **Users arrive and come back over time.** Users arrive across the three-year span and act in
   sessions: actions minutes apart inside a sitting (log-normal, median 4 minutes), pauses of an hour
   to a year between sittings (log-normal, median 2 days). The state a feed sees (interaction count,
   days since the first and since the last action) varies the way it does in a real feed.
3. **Onboarding, then settled behaviour.** A new user's first ``ONBOARDING_ACTIONS`` actions, in one
   sitting, are picks from an onboarding page of hits, for their popularity and their taste weighted
   alike. After that users choose mostly by taste, a little by popularity and novelty, and by
   similarity to the previous item of the same sitting.
4. **Taste drifts.** On top of the stable taste, a user's current interest wanders (an
   Ornstein-Uhlenbeck walk in the latent space) a little with every action and more with every day
   away, so recent actions say more about the next ones than old actions do.
5. **Items rise and fade.** Most of the catalogue predates the data; the rest is released while it
   runs, cannot be chosen before its release day, and has a launch buzz that fades over weeks to
   months down to an evergreen floor. Base appeal is Zipf-like. What is popular therefore depends on
   when you ask.

A choice is a draw from the softmax over the unseen items of taste + popularity + buzz + locality
terms, made for all users at once, one step at a time, by the Gumbel-max trick, so the default data
takes well under a second.
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
DAY_S = 86_400
SPAN_DAYS = 3 * 365  # ML-1M's ratings span about three years
TIME_SPAN_S = SPAN_DAYS * DAY_S

# Each strength below was set by measuring what the default first run (README Quickstart) shows
# against the baselines; the comment says what it stands for.

# 1. Taste from the profile (per-dimension scales of the parts of a user's stable taste).
_SEGMENT_SCALE = 1.5  # gender and age directions, the strongest part: a new user's profile tells
_OCCUPATION_SCALE = 1.0  # occupation too, so the profile says more than the (gender, age) segment
_PERSONAL_SCALE = 0.7  # what no profile field explains: only the user's own actions reveal it
_ITEM_NOISE = 0.15  # item-specific part of an item's vector next to its genres' mean: genres matter

# 2. Sessions and returns.
SESSION_MEAN_ACTIONS = 6.0  # actions per sitting (geometric): a few titles, then a pause
_IN_SESSION_GAP_S = (240.0, 0.8)  # log-normal (median, sigma) inside a sitting: minutes
_BETWEEN_SESSION_GAP_S = (2.0 * DAY_S, 1.6)  # log-normal between sittings: hours to months
MIN_SESSION_PAUSE_S = 3_600  # a pause shorter than an hour would not separate sittings
_MAX_SESSION_PAUSE_S = 365 * DAY_S  # nobody in the data stays away longer than a year

# 3. Onboarding, then settled choices: weights of taste (standardised over the items), log base
#    appeal, log buzz and similarity to the previous item of the sitting, in the choice logits.
ONBOARDING_ACTIONS = 10  # "pick 10 titles you like" from a page of hits, in the first sitting
_ONBOARDING_TASTE = 1.5  # the picks follow taste, as much as ...
_ONBOARDING_POPULARITY = 1.5  # ... popularity: the page shows the catalogue's hits
_ONBOARDING_BUZZ = 0.0  # the page is the all-time hits, not this week's releases
_TASTE_WEIGHT = 3.0  # settled users choose mostly by taste ...
_POPULARITY_WEIGHT = 0.3  # ... a little by popularity ...
_BUZZ_WEIGHT = 0.3  # ... a little by what is new ...
_LOCALITY_WEIGHT = 3.0  # ... and by likeness to the previous title of the sitting (a binge)
_UNRELEASED = -1e4  # logit of an unreleased item: chosen only when nothing released is left

# 4. Drift of the current interest around the stable taste (Ornstein-Uhlenbeck).
_DRIFT_SCALE = 1.3  # the wandering part outweighs the unit-length stable taste: interests change
_DRIFT_ACTIONS = 20.0  # actions over which the wandering part keeps 1/e of its correlation ...
_DRIFT_DAYS = 30.0  # ... and days away that do the same: a month away, a different mood

# 5. Item lifecycle.
_BACK_CATALOG_SHARE = 0.7  # most of a catalogue is older titles, already out when the data starts
_BACK_CATALOG_DAYS = 2 * 365  # how far back their releases go
_BUZZ_DAYS = (14.0, 180.0)  # log-uniform time for a launch buzz to fade by 1/e: weeks to months
_EVERGREEN_FLOOR = 0.05  # share of its launch appeal an item keeps once the buzz is gone
_ZIPF_EXPONENT = 1.0  # base appeal of the item of rank r is r ** -1, as in real catalogues


def generate_synthetic(
    n_users: int = 600,
    n_items: int = 1000,
    interactions_per_user: tuple[int, int] = (20, 150),
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
    release_days, buzz_days = _item_lifecycles(rng, n_items)
    _set_years(rng, items, release_days)
    users, stable_taste = _make_users(rng, n_users)
    log_popularity = _zipf_log_popularity(rng, n_items)
    lengths = _sequence_lengths(rng, n_users, low, high)
    times, new_session = _timelines(rng, lengths, high)

    # Longest sequences first: the users still choosing at a step are then a prefix of the arrays.
    order = np.argsort(-lengths, kind="stable")
    chosen, tastes = _choose_sequences(
        rng,
        stable_taste[order],
        item_vectors,
        _popularity_tables(log_popularity, release_days, buzz_days),
        lengths[order],
        times[order],
        new_session[order],
    )
    unsorted = np.empty_like(order)
    unsorted[order] = np.arange(n_users)
    interactions = _interaction_table(rng, chosen[unsorted], times, tastes[unsorted], item_vectors)
    name = f"synthetic:{n_users}" + (f":seed{seed}" if seed else "")
    return make_interaction_data(interactions, users, items, name)


def _make_items(rng: np.random.Generator, n_items: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The item table (years set later) and a (items x genres) 0/1 matrix; 1-3 genres each."""
    membership = np.zeros((n_items, len(GENRES)), dtype=bool)
    counts = rng.choice([1, 2, 3], size=n_items, p=[0.5, 0.35, 0.15])
    genre_p = _GENRE_WEIGHTS / _GENRE_WEIGHTS.sum()
    for index, count in enumerate(counts):
        membership[index, rng.choice(len(GENRES), size=count, replace=False, p=genre_p)] = True
    genre_names = np.array(GENRES)
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1, dtype=np.int64),
            "genres": [GENRE_SEPARATOR.join(genre_names[row]) for row in membership],
        }
    )
    return items, membership


def _item_vectors(rng: np.random.Generator, membership: np.ndarray, genre_vectors: np.ndarray) -> np.ndarray:
    """Mean of the item's genre vectors plus item-specific noise: genre-correlated, not genre-determined."""
    genre_part = membership @ genre_vectors / membership.sum(axis=1, keepdims=True)
    return genre_part + rng.normal(scale=_ITEM_NOISE, size=genre_part.shape)


def _item_lifecycles(rng: np.random.Generator, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Release day (relative to the first day of the data; negative for the back catalogue) and the
    days its launch buzz takes to fade by 1/e, per item."""
    back = rng.random(n_items) < _BACK_CATALOG_SHARE
    release_days = np.where(
        back,
        -rng.integers(1, _BACK_CATALOG_DAYS + 1, size=n_items),
        rng.integers(0, SPAN_DAYS, size=n_items),
    )
    buzz_days = np.exp(rng.uniform(np.log(_BUZZ_DAYS[0]), np.log(_BUZZ_DAYS[1]), size=n_items))
    return release_days.astype(np.int64), buzz_days


def _set_years(rng: np.random.Generator, items: pd.DataFrame, release_days: np.ndarray) -> None:
    """Film years, skewed towards recent ones like MovieLens (1920-2000); titles released while the
    data runs are new films (a year or two old), the back catalogue is older."""
    n_items = len(items)
    old = np.round(2000 - rng.exponential(12.0, size=n_items))
    new = np.round(2000 - rng.exponential(0.7, size=n_items))
    years = np.clip(np.where(release_days >= 0, new, old), 1920, 2000).astype(np.int64)
    items["title"] = [f"Synthetic Movie {i} ({y})" for i, y in zip(items["item_id"], years, strict=True)]
    items["year"] = years


def _lifecycle_log_appeal(release_days: np.ndarray, buzz_days: np.ndarray, days: np.ndarray) -> np.ndarray:
    """(days x items) log of each item's appeal on each day relative to its launch peak,
    log(floor + (1 - floor) * exp(-age / buzz)); -inf before the release day."""
    age = np.asarray(days, dtype=np.float64)[:, None] - release_days[None, :]
    buzz = np.exp(-np.maximum(age, 0.0) / buzz_days[None, :])
    with np.errstate(divide="ignore"):
        return np.where(age >= 0, np.log(_EVERGREEN_FLOOR + (1 - _EVERGREEN_FLOOR) * buzz), -np.inf)


def _popularity_tables(
    log_popularity: np.ndarray, release_days: np.ndarray, buzz_days: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (days x items) popularity terms of the choice logits for each day of the span, for the
    onboarding page and for settled users; unreleased items get a large negative logit that grows with
    the wait, so they are chosen only when nothing else is left, the soonest release first."""
    days = np.arange(SPAN_DAYS + 1)
    appeal = _lifecycle_log_appeal(release_days, buzz_days, days)
    released = np.isfinite(appeal)
    appeal = np.where(released, appeal, 0.0)
    unreleased = np.where(released, 0.0, _UNRELEASED - (release_days[None, :] - days[:, None]))
    tables = []
    for popularity, buzz in ((_ONBOARDING_POPULARITY, _ONBOARDING_BUZZ), (_POPULARITY_WEIGHT, _BUZZ_WEIGHT)):
        tables.append((popularity * log_popularity[None, :] + buzz * appeal + unreleased).astype(np.float32))
    return tables[0], tables[1]


def _make_users(rng: np.random.Generator, n_users: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Profiles and stable tastes; taste = gender + age direction + occupation offset + personal noise."""
    gender_dirs = rng.normal(scale=_SEGMENT_SCALE, size=(len(GENDERS), LATENT_DIM))
    age_dirs = rng.normal(scale=_SEGMENT_SCALE, size=(len(AGES), LATENT_DIM))
    occupation_dirs = rng.normal(scale=_OCCUPATION_SCALE, size=(N_OCCUPATIONS, LATENT_DIM))

    gender = rng.choice(len(GENDERS), size=n_users, p=_GENDER_WEIGHTS / _GENDER_WEIGHTS.sum())
    age = rng.choice(len(AGES), size=n_users, p=_AGE_WEIGHTS / _AGE_WEIGHTS.sum())
    occupation = rng.integers(0, N_OCCUPATIONS, size=n_users)
    zip_codes = rng.integers(0, 100_000, size=n_users)

    taste = gender_dirs[gender] + age_dirs[age] + occupation_dirs[occupation]
    taste += rng.normal(scale=_PERSONAL_SCALE, size=taste.shape)
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


def _timelines(rng: np.random.Generator, lengths: np.ndarray, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(users x steps) timestamps (int64, strictly increasing along each user's length) and whether
    each step opens a session. Users arrive uniformly over the span, late enough to fit in it."""
    n_users = len(lengths)
    new_session = rng.random((n_users, n_steps)) < 1.0 / SESSION_MEAN_ACTIONS
    new_session[:, 0] = True
    new_session[:, 1 : ONBOARDING_ACTIONS + 1] = False  # the onboarding page is one sitting
    median, sigma = _IN_SESSION_GAP_S
    within = np.maximum(np.round(median * np.exp(sigma * rng.normal(size=(n_users, n_steps)))), 1)
    median, sigma = _BETWEEN_SESSION_GAP_S
    pauses = np.round(median * np.exp(sigma * rng.normal(size=(n_users, n_steps))))
    pauses = np.clip(pauses, MIN_SESSION_PAUSE_S, _MAX_SESSION_PAUSE_S)
    gaps = np.where(new_session, pauses, within).astype(np.int64)
    gaps[:, 0] = 0
    gaps[np.arange(n_steps)[None, :] >= lengths[:, None]] = 0
    offsets = np.cumsum(gaps, axis=1)
    duration = offsets[np.arange(n_users), lengths - 1]
    # A user whose activity is longer than the span is squeezed into it (pauses shortened alike).
    squeeze = np.minimum(1.0, (TIME_SPAN_S - n_steps) / np.maximum(duration, 1))
    offsets = np.floor(offsets * squeeze[:, None]).astype(np.int64) + np.arange(n_steps)[None, :]
    duration = offsets[np.arange(n_users), lengths - 1]
    room = np.maximum(TIME_SPAN_S - duration, 0)
    arrivals = FIRST_TIMESTAMP + np.floor(rng.random(n_users) * room).astype(np.int64)
    return arrivals[:, None] + offsets, new_session


def _choose_sequences(
    rng: np.random.Generator,
    stable_taste: np.ndarray,
    item_vectors: np.ndarray,
    popularity_tables: tuple[np.ndarray, np.ndarray],
    lengths: np.ndarray,
    times: np.ndarray,
    new_session: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Item indices per user and step (-1 past a user's length), sampled without repeats, and the
    user's current taste at each step. Users must come sorted by length, longest first.

    At each step the logits are one matrix product, (scaled taste + locality query) @ itemsᵀ, plus the
    day's popularity row, Gumbel noise and -inf on the items already seen; their argmax is a draw from
    the softmax over the unseen items."""
    n_users, n_items = len(stable_taste), len(item_vectors)
    n_steps = times.shape[1]
    unit_items = item_vectors / np.linalg.norm(item_vectors, axis=1, keepdims=True)
    items_t = np.ascontiguousarray(unit_items.T, dtype=np.float32)
    # The taste term is taste · item standardised over the items; its per-user mean does not change a
    # user's argmax, so only the division by the standard deviation is kept (from the covariance).
    item_cov = np.cov(unit_items.T, bias=True)
    day = np.clip((times - FIRST_TIMESTAMP) // DAY_S, 0, SPAN_DAYS)

    chosen = np.full((n_users, n_steps), -1, dtype=np.int64)
    tastes = np.zeros((n_users, n_steps, LATENT_DIM))
    seen = np.zeros((n_users, n_items), dtype=np.float32)  # -inf once chosen
    drift_per_dim = _DRIFT_SCALE / np.sqrt(LATENT_DIM)
    wander = rng.normal(scale=drift_per_dim, size=stable_taste.shape)  # the stationary start
    n_active = n_users
    for step in range(int(lengths.max())):
        while lengths[n_active - 1] <= step:
            n_active -= 1
        active = slice(0, n_active)
        if step:
            away_days = (times[active, step] - times[active, step - 1]) / DAY_S
            keep = np.exp(-1.0 / _DRIFT_ACTIONS - away_days / _DRIFT_DAYS)[:, None]
            shock = rng.normal(scale=drift_per_dim, size=(n_active, LATENT_DIM))
            wander[active] = keep * wander[active] + np.sqrt(1 - keep**2) * shock
        taste = stable_taste[active] + wander[active]
        tastes[active, step] = taste
        onboarding = step < ONBOARDING_ACTIONS
        weight = _ONBOARDING_TASTE if onboarding else _TASTE_WEIGHT
        spread = np.sqrt(np.einsum("ud,de,ue->u", taste, item_cov, taste)) + 1e-9
        query = taste * (weight / spread)[:, None]
        if step and not onboarding:
            # Locality: the previous item pulls only inside a sitting.
            same = ~new_session[active, step]
            query[same] += _LOCALITY_WEIGHT * unit_items[chosen[active, step - 1][same]]
        logits = popularity_tables[0 if onboarding else 1][day[active, step]]
        # einsum, not BLAS: for products this small, BLAS threads only contend with other work.
        logits += np.einsum("ud,dn->un", query.astype(np.float32), items_t)
        logits += seen[active]
        logits -= _minus_gumbel(rng, logits.shape)
        pick = logits.argmax(axis=1)
        chosen[active, step] = pick
        seen[np.arange(n_active), pick] = -np.inf
    return chosen, tastes


def _minus_gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 log(-log U), U uniform: minus a Gumbel(0, 1) sample, computed in place; U is kept away
    from 0 so that no draw is infinite (an infinite one would beat the -inf of a seen item)."""
    noise = rng.random(size=shape, dtype=np.float32)
    np.maximum(noise, 1e-30, out=noise)
    np.log(noise, out=noise)
    np.negative(noise, out=noise)
    return np.log(noise, out=noise)


def _interaction_table(
    rng: np.random.Generator,
    chosen: np.ndarray,
    times: np.ndarray,
    tastes: np.ndarray,
    item_vectors: np.ndarray,
) -> pd.DataFrame:
    """Flattens the choices; ratings follow the taste of the moment (1-5)."""
    user_index, step = np.nonzero(chosen >= 0)
    item_index = chosen[user_index, step]
    n = len(user_index)
    affinity = np.einsum("ij,ij->i", tastes[user_index, step], item_vectors[item_index])
    z = (affinity - affinity.mean()) / (affinity.std() + 1e-9)
    rating = np.clip(np.round(3.6 + 0.9 * z + rng.normal(scale=0.7, size=n)), 1, 5)
    return pd.DataFrame(
        {
            "user_id": user_index.astype(np.int64) + 1,
            "item_id": item_index + 1,
            "timestamp": times[user_index, step],
            "rating": rating.astype(np.float32),
        }
    )
