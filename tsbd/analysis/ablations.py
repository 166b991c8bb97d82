"""TSBD's ablations and sweeps beyond n and m (paper Tables 3, 4, 7, 8; Appendices H, K)."""
