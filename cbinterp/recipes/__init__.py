"""Training recipes.

The generic codebook phase runner, the FSM model's presets, and `lm` (the codebook language model)."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
