"""fasttrain: a high-throughput trainer for PyTorch image models.

Importing the package has no side effects: no CUDA initialisation, no DALI import, no flags changed.
Entry points live in their modules: ``fasttrain.engine.train``, ``fasttrain.predict.predict``,
``fasttrain.autotune.autotune``, ``fasttrain.bench.bench``.
"""

__version__ = "0.1.0"
