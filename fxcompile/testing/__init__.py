"""Models and helpers for fxcompile's own tests, benchmarks and ``fxcompile demo``.

``models``: two small models written in plain torch (the demo's ResNet- and BERT-style nets).
``zoo``: Hugging Face ``transformers`` architectures from small configs; transformers comes with
the ``[dev]`` extra (``pip install "fxcompile[dev]"``) and is imported only when a zoo model is built.
``benchmarking``: timing shared by the CLI demo and the scripts in benchmarks/.
``digits``: scikit-learn's digits and a small CNN and patch transformer trained on them, for int8
accuracy checks (scikit-learn, also a ``[dev]`` extra, is imported only when the data is loaded).
``tiny_lm``: a small byte-level GPT trained on this Python's standard-library sources (text every
machine has), cached on disk, with perplexity and per-channel outlier measurements.

Importing this package imports none of them.
"""
