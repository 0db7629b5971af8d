"""Index build and search configuration, read from ``COLDWARM_INDEX_``-prefixed environment variables
(e.g. ``COLDWARM_INDEX_TYPE=ivf``, ``COLDWARM_INDEX_NPROBE=32``).

The default is an exact inner-product index: at catalog sizes like MovieLens' (a few thousand items)
exhaustive search costs well under a millisecond, and approximate indexes only pay off far above that.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

IndexType = Literal["flat", "ivf", "hnsw"]


class IndexSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COLDWARM_INDEX_", extra="ignore")

    type: IndexType = Field("flat", description="flat: exact; ivf / hnsw: approximate inner product")
    nlist: int | None = Field(
        None, ge=1, description="IVF lists; None: about 4·sqrt(n), at most n // 39 (FAISS wants 39/list)"
    )
    nprobe: int = Field(16, ge=1, description="IVF lists visited per query")
    hnsw_m: int = Field(32, ge=2, description="HNSW links per node")
    ef_construction: int = Field(200, ge=1)
    ef_search: int = Field(
        128, ge=1, description="HNSW search breadth; keep it >= k (below k, recall drops fast)"
    )
    mmap: bool = Field(
        True,
        description="memory-map the index file when serving (FAISS's IO_FLAG_MMAP_IFC: flat, IVF and HNSW "
        "codes stay in the page cache), so that the workers of one machine share its pages",
    )
    use_gpu: bool = Field(True, description="build IVF on the GPU when this FAISS build has one and sees one")
    search_backend: Literal["auto", "faiss", "torch"] = Field(
        "auto",
        description="engine of the serving search (COLDWARM_INDEX_SEARCH_BACKEND). auto: FAISS on the GPU "
        "when it has a GPU build, else exact torch on the GPU; on the CPU, the FAISS index as built. "
        "faiss: the index on the serving device; torch: exact matmul + top-k on the serving device",
    )
    exact_batch_from: int = Field(
        16,
        ge=0,
        description="with a flat index searched by FAISS on the CPU, batches of at least this many queries "
        "are searched by the exact torch search instead, their exclusions left out before the top-k: "
        "the same ranking, cheaper for large batches, dearer for small ones (bench/search_backend_cost.py)"
        "; 0: FAISS for every batch",
    )
    recall_sample: int = Field(1000, ge=1, description="queries used to measure the index's recall")
    recall_k: int = Field(100, ge=1)
