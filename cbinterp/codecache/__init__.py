"""Code caches: code ids of every codebook over a data set, queries on them, and text features as token masks."""
