"""Latent reasoning methods behind one small interface (base.py): LVR now; HyLaR, DeepLatent next."""
