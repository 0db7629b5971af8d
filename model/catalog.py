"""Where item ids sit in a catalog of sorted ids: the one lookup that training, evaluation and serving
share. numpy only, so that the torch search backend can use it where nothing else is installed."""

from __future__ import annotations

import numpy as np

from model.evaluation.metrics import EMPTY_SLOT


def catalog_indices(catalog_item_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """Positions of item ids (any shape) in the sorted ``catalog_item_ids``; -1 for ids outside it."""
    pos = np.searchsorted(catalog_item_ids, item_ids)
    pos = np.clip(pos, 0, max(len(catalog_item_ids) - 1, 0))
    found = len(catalog_item_ids) > 0 and catalog_item_ids[pos] == item_ids
    return np.where(found, pos, EMPTY_SLOT).astype(np.int64)
