"""Sparse dictionaries to compare with codebooks: sparse autoencoders (TopK and L1) read at the same hook sites.

`sae` (the model, its config, save / load), `sae_train` (training on activations a callable hands out),
`sae_hooks` (an SAE at a hook name of a HookedTransformer, its latents in `run_with_cache` as a codebook's codes
are, and a code cache of its top latent ids that `probe_heldout` reads as it reads codes).
"""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
