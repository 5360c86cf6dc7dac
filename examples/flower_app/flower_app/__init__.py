"""A Flower app using flsec's RobustStrategy and attacker wrapper."""
