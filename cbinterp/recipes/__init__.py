"""Training recipes: presets and phase runners built from library calls (`lm`: the codebook language model)."""
