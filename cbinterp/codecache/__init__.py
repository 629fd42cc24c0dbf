"""Code caches: code ids of every codebook over a data set, queries on them, and text features as token masks."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
