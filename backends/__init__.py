"""fxcompile's backends. Each module has one entry, ``lower(gm, example_inputs, options)``,
returning a ``Lowered`` runner over the graph's flat inputs (see ``fxcompile.backend_api``)."""
