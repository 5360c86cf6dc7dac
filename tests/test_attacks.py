from __future__ import annotations

import pytest
import torch

from flsec.attacks import boost, default_boost_factor, flip_labels, make_trigger, poison_batch, stamp
from flsec.attacks.backdoor import num_poisoned
from flsec.config import TriggerConfig
from flsec.errors import ConfigError


def test_default_trigger_is_bottom_right_checkerboard() -> None:
    t = make_trigger(TriggerConfig(), 28, 28)
    assert t.bbox == (24, 27, 24, 27)  # 3x3, one pixel from the corner
    expected = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(t.pattern[0, 24:27, 24:27], expected)
    assert int(t.mask.sum()) == 9


def test_stamp_touches_only_the_patch_on_every_channel() -> None:
    t = make_trigger(TriggerConfig(position="top_left", offset=0, size=2, pattern="square", value=0.5), 6, 6)
    x = torch.full((2, 3, 6, 6), 0.2)
    y = stamp(x, t)
    assert torch.all(y[:, :, :2, :2] == 0.5)
    assert torch.all(y[:, :, 2:, :] == 0.2) and torch.all(y[:, :, :, 2:] == 0.2)
    assert torch.all(x == 0.2)  # not in place


def test_trigger_too_big_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="attack.trigger.size"):
        make_trigger(TriggerConfig(size=8, offset=1), 8, 8)


def test_dba_parts_cover_the_trigger_disjointly() -> None:
    t = make_trigger(TriggerConfig(size=4, pattern="square"), 12, 12)
    parts = [t.part(i, 2) for i in range(2)]
    assert not torch.any(parts[0].mask & parts[1].mask)
    assert torch.equal(parts[0].mask | parts[1].mask, t.mask)


@pytest.mark.parametrize(("batch", "fraction", "expected"), [(1, 0.5, 1), (32, 0.5, 16), (10, 0.25, 3), (4, 1.0, 4)])
def test_poison_fraction(batch: int, fraction: float, expected: int) -> None:
    assert num_poisoned(batch, fraction) == expected
    t = make_trigger(TriggerConfig(), 8, 8)
    x, y = torch.rand(batch, 1, 8, 8), torch.full((batch,), 7)
    xp, yp, mask = poison_batch(x, y, t, target=0, fraction=fraction, generator=torch.Generator().manual_seed(0))
    assert int(mask.sum()) == expected
    assert torch.all(yp[mask] == 0) and torch.all(yp[~mask] == 7)
    assert torch.equal(xp[~mask], x[~mask])
    assert torch.equal(xp[mask], stamp(x[mask], t))


def test_boost_and_label_flip() -> None:
    assert default_boost_factor(20, 1.0) == 20 and default_boost_factor(20, 0.5, attackers_in_round=2) == 20
    assert torch.equal(boost(torch.tensor([1.0, -2.0]), 3.0), torch.tensor([3.0, -6.0]))
    assert flip_labels(torch.tensor([7, 1, 7, 0]), 7, 1).tolist() == [1, 1, 1, 0]
