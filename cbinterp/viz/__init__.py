"""Figures (plotly) and HTML views of codes."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
