"""FAISS index over a model's bias-folded item vectors: build (``build.build_index_artifacts``), load
(``build.load_index``) and search (``faiss_index.search``). Settings: ``settings.IndexSettings``.

Nothing is imported here, so that reading the settings does not load faiss or torch.
"""
