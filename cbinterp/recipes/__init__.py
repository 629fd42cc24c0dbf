"""Training recipes: the generic codebook phase runner and the FSM model's presets."""
