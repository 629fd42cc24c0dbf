"""The codebook hook point and what acts on it: attaching, interventions, code ids, hook names, heads."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
