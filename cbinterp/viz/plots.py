"""Plotly figures for code-versus-neuron comparisons."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cbinterp.core.codebooks.heads import code_label, codebook_label, is_missing_head

__all__ = [
    "code_frequency_figure",
    "code_vs_neuron_figure",
    "heldout_probe_figure",
    "precision_recall_figure",
    "probe_figure",
    "state_code_figure",
]

_NEURON_PREFIX = "neuron_precision_"
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]


def code_vs_neuron_figure(
    table: pd.DataFrame, summary: pd.DataFrame, title: str = "Code vs neuron precision", kind: str = "state"
) -> go.Figure:
    """Left: mean precision of each codebook's `kind` codes beside the best neurons' at the same recall.

    Right: per MLP codebook, the distribution of those precisions (one box per code set and neuron set).

    Args:
        table: one row per code, as from `fsm_code_table` (columns `codebook`, `head`, `site`, `kind`,
            `precision`, and `neuron_precision_<set>` per neuron set).
        summary: per codebook and head, as from `summarize_state_codes`.
    """
    neuron_sets = [c.removeprefix(_NEURON_PREFIX) for c in table.columns if c.startswith(_NEURON_PREFIX)]
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.6, 0.4],
        subplot_titles=(f"mean precision of {kind} codes, per codebook", f"{kind} codes of the MLP codebooks"),
    )
    labels = [
        f"L{row.layer} {row.site}" + ("" if is_missing_head(row.head) else f" h{int(row.head)}")
        for row in summary.itertuples()
    ]
    fig.add_trace(
        go.Bar(
            x=labels, y=summary["state_code_precision_mean"], name="codes", marker_color=_COLORS[0], legendgroup="codes"
        ),
        row=1,
        col=1,
    )
    for i, neuron_set in enumerate(neuron_sets, start=1):
        column = f"{neuron_set}_precision_mean"
        if column in summary:
            fig.add_trace(
                go.Bar(
                    x=labels,
                    y=summary[column],
                    name=f"best neuron ({neuron_set})",
                    marker_color=_COLORS[i % len(_COLORS)],
                    legendgroup=neuron_set,
                ),
                row=1,
                col=1,
            )
    rows = table[(table["site"] == "mlp") & (table["kind"] == kind)]
    layer = rows["layer"].astype(str).radd("L")
    fig.add_trace(
        go.Box(
            x=layer, y=rows["precision"], name="codes", marker_color=_COLORS[0], legendgroup="codes", showlegend=False
        ),
        row=1,
        col=2,
    )
    for i, neuron_set in enumerate(neuron_sets, start=1):
        fig.add_trace(
            go.Box(
                x=layer,
                y=rows[_NEURON_PREFIX + neuron_set],
                name=f"best neuron ({neuron_set})",
                marker_color=_COLORS[i % len(_COLORS)],
                legendgroup=neuron_set,
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    fig.update_layout(title=title, barmode="group", boxmode="group", height=480, width=1200)
    fig.update_yaxes(title_text="precision", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    return fig


def code_frequency_figure(cache, name: str, head=None, title: str | None = None) -> go.Figure:
    """How often each code of one codebook fires in a `CodeCache`, most frequent first (log scale).

    `head` as in `code_frequencies` (None or missing: every head, or the codebook without heads; the title names a
    head only for a per-head codebook)."""
    from cbinterp.codecache.queries import code_frequencies, head_of

    counts = code_frequencies(cache, name, head=head).sort(descending=True).values
    fig = go.Figure(go.Bar(y=counts.tolist(), marker_color=_COLORS[0]))
    dead = int((counts == 0).sum())
    fig.update_layout(
        title=title or f"{codebook_label(name, head_of(cache, name, head))}: code frequency ({dead} never fire)",
        xaxis_title="code rank",
        yaxis_title="fires",
        yaxis_type="log",
        height=380,
        width=800,
    )
    return fig


def precision_recall_figure(
    table: pd.DataFrame, label: str = "feature", title: str = "codes as classifiers"
) -> go.Figure:
    """Precision against recall, one point per row of a code table, coloured by `label` when that column is present.

    Code tables come from `probe`, `search_codes` or `code_feature_table`."""
    fig = go.Figure()
    groups = table.groupby(label, sort=False) if label in table.columns else [("codes", table)]
    for key, rows in groups:
        text = (
            [f"{codebook_label(r.codebook, getattr(r, 'head', None))} code {r.code}" for r in rows.itertuples()]
            if {"codebook", "code"} <= set(rows.columns)
            else None
        )
        fig.add_trace(go.Scatter(x=rows["recall"], y=rows["precision"], mode="markers", name=str(key), text=text))
    fig.update_layout(
        title=title,
        xaxis_title="recall",
        yaxis_title="precision",
        height=420,
        width=700,
        xaxis_range=[0, 1.02],
        yaxis_range=[0, 1.02],
    )
    return fig


def probe_figure(table: pd.DataFrame, title: str = "Regex probes: best code vs best neuron"):
    """Grouped bars per feature: the best code's precision beside the best neuron's at that code's recall.

    The best code's precision is the max over codebooks/heads, labelled with its recall; the neuron's is
    `best_neuron_precision`, when present."""
    fig = go.Figure()
    if table.empty:
        fig.update_layout(title=title)
        return fig
    idx = table.groupby("feature_name", sort=False)["precision"].idxmax()
    top = table.loc[idx.to_numpy()]
    label = [f"{r.feature_name} ({code_label(r.codebook, r.head, r.code)})" for r in top.itertuples()]
    recall = [f"recall {r:.2f}" for r in top["recall"]]
    fig.add_bar(name="best code", x=list(top["feature_name"]), y=list(top["precision"]), hovertext=label, text=recall)
    if "best_neuron_precision" in top.columns:
        fig.add_bar(name="best neuron", x=list(top["feature_name"]), y=list(top["best_neuron_precision"]))
    fig.update_layout(title=title, barmode="group", yaxis_title="precision", yaxis_range=[0, 1.05])
    return fig


def heldout_probe_figure(table: pd.DataFrame, title: str = "Regex features, held out: best code vs best neuron"):
    """Grouped bars per feature from `probe_heldout`'s table: best code's and best neuron's precision on half B.

    The best code's precision on the score half (B), beside the best neuron's (chosen on A, A's threshold applied on
    B), each labelled with its recall on B."""
    fig = go.Figure()
    if table.empty:
        fig.update_layout(title=title)
        return fig
    names = list(table["feature_name"])
    code_names = [
        code_label(r.codebook, r.head, r.code) if r.code >= 0 else "no code" for r in table.itertuples(index=False)
    ]
    bars = [("best code", "precision_b", "recall_b", code_names)]
    if "neuron_best_precision_b" in table.columns:
        neuron_label = [f"{h}[{u}]" for h, u in zip(table["neuron_best_hook"], table["neuron_best_unit"])]
        bars.append(("best neuron", "neuron_best_precision_b", "neuron_best_recall_b", neuron_label))
    for color, (name, precision, recall, hovertext) in zip(_COLORS, bars):
        text = [f"R {r:.2f}" for r in table[recall]]
        fig.add_bar(name=name, x=names, y=list(table[precision]), text=text, hovertext=hovertext, marker_color=color)
    fig.update_layout(
        title=title, barmode="group", yaxis_title="precision on held-out half B", yaxis_range=[0, 1.05], width=1100
    )
    return fig


def state_code_figure(states: pd.DataFrame, title: str = "State codes") -> go.Figure:
    """Per state (x): the precision and recall of its best code and the precision of the best neurons.

    The code comes from the feature-first search, scored on the held-out half; the neurons, where measured, are the
    best of each set at that code's recall."""
    x = states["name"] if "name" in states else states["feature"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=states["best_precision"], mode="markers", name="best code: precision"))
    fig.add_trace(go.Scatter(x=x, y=states["best_recall"], mode="markers", name="best code: recall"))
    for i, column in enumerate(c for c in states.columns if c in ("site_outputs_precision", "mlp_neurons_precision")):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=states[column],
                mode="markers",
                name=f"best neuron ({column.removesuffix('_precision')}) at the code's recall: precision",
                marker_color=_COLORS[(i + 2) % len(_COLORS)],
            )
        )
    fig.update_layout(title=title, height=450, width=1200, yaxis=dict(range=[0, 1.02]))
    return fig
