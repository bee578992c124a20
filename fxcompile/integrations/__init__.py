"""fxcompile as a backend of other front ends.

``dynamo``: the torch.compile backend, found by torch through the ``torch_dynamo_backends``
entry point (``torch.compile(model, backend="fxcompile")`` without importing fxcompile).
``generation``: Hugging Face ``generate()`` over a decoder compiled into prefill and decode graphs.
"""
