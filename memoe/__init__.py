"""memoe: MEMoE model editing (mixture-of-experts bypass adapters with knowledge-anchor routing)."""

__version__ = "0.1.0"
