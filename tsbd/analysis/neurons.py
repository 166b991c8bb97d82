"""Per-neuron analyses: activations (paper Fig. 3) and TAC coverage (Fig. 4, Appendix F)."""
