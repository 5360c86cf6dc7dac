"""Data and model poisoning attacks."""

from flsec.attacks.backdoor import Trigger, make_trigger, poison_batch, stamp
from flsec.attacks.boosting import boost, default_boost_factor
from flsec.attacks.label_flip import flip_labels

__all__ = ["Trigger", "boost", "default_boost_factor", "flip_labels", "make_trigger", "poison_batch", "stamp"]
