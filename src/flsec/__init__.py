"""flsec: federated-learning security research.

Train a federation under backdoor attack once, then attack its checkpoint many times:
gradient inversion of captured client updates, backdoor verification and unlearning.
"""

__version__ = "0.1.0"
