"""The paper's analyses: observation 1 (clean vs poison unlearning NWC), observation 2
(gradient norms under clean unlearning, backdoored vs clean model) and the neuron / weight ratio
sweeps. Each is a function here returning plain data; the analyses of ``tsbd analyze``
(:mod:`tsbd.analysis.paper`, :mod:`~tsbd.analysis.neurons`, :mod:`~tsbd.analysis.ablations`) run
them on a saved model and write CSV, figures (PNG + SVG) and a Markdown section."""

from tsbd.analysis.observations import (
    NWCComparison,
    gradient_norms_during_unlearning,
    nwc_comparison,
    pearson,
    poison_unlearning_set,
)
from tsbd.analysis.sweeps import ratio_sweep

__all__ = ["NWCComparison", "gradient_norms_during_unlearning", "nwc_comparison", "pearson",
           "poison_unlearning_set", "ratio_sweep"]
