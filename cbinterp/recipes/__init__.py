"""Training recipes: the generic codebook phase runner, the FSM model's presets, and `lm` (the codebook language
model)."""
