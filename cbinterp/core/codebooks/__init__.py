"""The codebook hook point and what acts on it: attaching, interventions, code ids, hook names, heads."""
