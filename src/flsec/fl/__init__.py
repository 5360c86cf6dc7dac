"""Federated training: clients, server rounds, evaluation and checkpoints."""
