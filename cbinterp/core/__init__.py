"""Core: the codebook hook point, attaching it to a HookedTransformer, interventions, training and saving."""
