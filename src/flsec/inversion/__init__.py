"""Gradient inversion from checkpoints: cases (FedSGD / FedAvg), methods (registry), metrics."""

from flsec.inversion.methods import METHODS, InversionOutput, InversionSettings

__all__ = ["METHODS", "InversionOutput", "InversionSettings"]
