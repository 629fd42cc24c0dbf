"""Core: the codebook hook point, attaching it to a HookedTransformer, interventions, training and saving."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
