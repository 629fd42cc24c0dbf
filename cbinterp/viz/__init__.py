"""Figures (plotly) and HTML views of codes."""
