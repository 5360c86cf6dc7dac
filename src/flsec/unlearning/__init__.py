"""Backdoor verification from reconstructions, trigger estimation and corrective unlearning."""
