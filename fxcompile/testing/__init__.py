"""Models and helpers for fxcompile's own tests, benchmarks and ``fxcompile demo``.

``models``: two small models written in plain torch (the demo's ResNet- and BERT-style nets).
``zoo``: Hugging Face ``transformers`` architectures from small configs; transformers comes with
the ``[dev]`` extra (``pip install "fxcompile[dev]"``) and is imported only when a zoo model is built.
``benchmarking``: timing shared by the CLI demo and the scripts in benchmarks/.

Importing this package imports none of them.
"""
