"""Offline analyses of trained networks (information-theoretic layer analysis)."""
