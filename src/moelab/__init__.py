"""moelab: training dynamics for sparse Mixture-of-Experts."""

__version__ = "0.1.0"
