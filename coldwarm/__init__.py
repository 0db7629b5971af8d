"""The ``coldwarm`` command: the composition root of the system.

It is the one package that imports every layer (``model`` for training and evaluation, ``index_builder``
for the FAISS index, ``service`` for the feature store and the API); the layers below never import it,
and ``model`` never imports ``index_builder`` or ``service`` (tests/test_layers.py).
"""
