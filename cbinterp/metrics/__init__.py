"""Codes and neurons as classifiers of features: torch kernels (`classifiers`), pandas tables (`tables`), probes."""

from cbinterp.metrics.classifiers import (
    DEFAULT_CHUNK_ELEMENTS,
    BestNeurons,
    CodeFeatureCounts,
    NeuronRecallStats,
    best_neuron_precision_at_recall,
    best_neuron_precision_batch,
    code_feature_counts,
    neuron_precision_at_recall,
    recall_targets,
)
from cbinterp.metrics.tables import TABLE_COLUMNS, add_neuron_precision, code_feature_table

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "TABLE_COLUMNS",
    "BestNeurons",
    "CodeFeatureCounts",
    "NeuronRecallStats",
    "add_neuron_precision",
    "best_neuron_precision_at_recall",
    "best_neuron_precision_batch",
    "code_feature_counts",
    "code_feature_table",
    "neuron_precision_at_recall",
    "recall_targets",
]
