"""Seeded crop-and-flip augmentation of local training batches: known answers, reproducibility, order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flsec.data.augment import crop_flip, random_crop, random_flip
from flsec.fl.client import LocalSpec, client_batches

IMAGE = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def reference_crop(image: np.ndarray, padding: int, dy: int, dx: int) -> np.ndarray:
    """np.pad with zeros, then the H x W window at (dy, dx)."""
    h, w = image.shape[-2:]
    padded = np.pad(image, [(0, 0)] * (image.ndim - 2) + [(padding, padding), (padding, padding)])
    return padded[..., dy : dy + h, dx : dx + w]


def test_crop_known_answers() -> None:
    """Every output is one of the 9 windows of the 1-padded 3x3 image, each window appears, and image i's
    window is the offset (dy_i, dx_i) drawn from the same seed (all rows first, then all columns)."""
    n = 200
    out = random_crop(IMAGE.expand(n, 1, 3, 3), 1, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    for i in range(n):
        expected = reference_crop(IMAGE.numpy()[0], 1, int(dy[i]), int(dx[i]))
        np.testing.assert_array_equal(out[i].numpy(), expected)
    windows = {tuple(o.flatten().tolist()) for o in out}
    assert len(windows) == 9
    assert (0, 0, 0, 0, 1, 2, 0, 4, 5) in windows  # (dy, dx) = (0, 0): shifted down-right
    assert (5, 6, 0, 8, 9, 0, 0, 0, 0) in windows  # (2, 2): shifted up-left
    assert (1, 2, 3, 4, 5, 6, 7, 8, 9) in windows  # (1, 1): unchanged


def test_crop_keeps_channels_aligned_and_shape() -> None:
    x = torch.rand(5, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    g = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 5, (5,), generator=g), torch.randint(0, 5, (5,), generator=g)
    for i in range(5):  # the same window for every channel of an image
        np.testing.assert_array_equal(out[i].numpy(), reference_crop(x[i].numpy(), 2, int(dy[i]), int(dx[i])))


def test_flip_known_answer() -> None:
    row = torch.tensor([[[[1.0, 2.0, 3.0]]]]).expand(64, 1, 1, 3)
    out = random_flip(row, torch.Generator().manual_seed(0))
    flipped = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.5
    for i in range(64):
        assert out[i, 0, 0].tolist() == ([3.0, 2.0, 1.0] if flipped[i] else [1.0, 2.0, 3.0])
    assert 16 < int(flipped.sum()) < 48


def test_crop_flip_is_seeded_and_draws_nothing_when_off() -> None:
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = crop_flip(x, 2, True, torch.Generator().manual_seed(7))
    assert torch.equal(a, crop_flip(x, 2, True, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, crop_flip(x, 2, True, torch.Generator().manual_seed(8)))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(crop_flip(x, 0, False, g), x)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())


def test_client_batches_without_augmentation_are_unchanged() -> None:
    """Default spec: the same batches (and generator draws) as a plain permutation per epoch."""
    x, y = torch.rand(10, 1, 4, 4), torch.arange(10)
    spec = LocalSpec(epochs=2, batch_size=4, lr=0.1)
    got = list(client_batches(x, y, spec, torch.Generator().manual_seed(5)))
    g = torch.Generator().manual_seed(5)
    expected = [(x[i], y[i]) for _ in range(2) for i in torch.randperm(10, generator=g).split(4)]
    assert len(got) == len(expected) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("crop,flip", [(2, False), (0, True), (2, True)])
def test_client_batches_augment_each_batch_then_transform(crop: int, flip: bool) -> None:
    """Each batch is crop_flip of its images with the stream's generator, and the transform (a trigger
    stamp) comes after augmentation: the patch sits at its fixed place in every image."""
    x, y = torch.rand(12, 1, 6, 6, generator=torch.Generator().manual_seed(0)), torch.arange(12)
    spec = LocalSpec(epochs=1, batch_size=5, lr=0.1, augment_crop=crop, augment_flip=flip)

    def stamp(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        del g
        xb = xb.clone()
        xb[..., -2:, -2:] = 1.0
        return xb, torch.zeros_like(yb)

    got = list(client_batches(x, y, spec, torch.Generator().manual_seed(1), stamp))
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(12, generator=g)
    for (xb, yb), idx in zip(got, order.split(5), strict=True):
        expected = crop_flip(x[idx], crop, flip, g)
        expected[..., -2:, -2:] = 1.0
        assert torch.equal(xb, expected) and torch.equal(yb, torch.zeros(len(idx), dtype=torch.long))
    assert not torch.equal(torch.cat([b[0] for b in got])[..., :4, :4], x[order][..., :4, :4])  # really augmented


# --- in federated training ----------------------------------------------------------------------


def test_vectorised_engine_gives_sequential_replies_with_augmentation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Augmentation is part of each client's batch stream, so both engines train on the same augmented
    (and, for the attacker, poisoned) batches: the same updates up to float rounding."""
    from flsec.fl.engines import CLIENT_ENGINES
    from flsec.fl.server import Server
    from tests.test_engines import _uneven_config

    cfg = _uneven_config()
    augmented = cfg.model_copy(update={"training": cfg.training.model_copy(update={"augment_crop": 2,
                                                                                   "augment_flip": True})})
    server = Server(augmented, tmp_path / "r")
    tasks = server.begin_round(1)
    seq = CLIENT_ENGINES.get("sequential")(server.fed).run(tasks)
    vec = CLIENT_ENGINES.get("vectorised")(server.fed).run(tasks)
    plain = CLIENT_ENGINES.get("sequential")(Server(cfg, tmp_path / "p").fed).run(tasks)
    for a, b, c in zip(seq, vec, plain, strict=True):
        assert torch.allclose(a.update, b.update, rtol=0, atol=1e-5), (a.client, (a.update - b.update).abs().max())
        assert a.capture is not None and b.capture is not None and a.capture.meta == b.capture.meta
        assert (a.capture.meta["augment_crop"], a.capture.meta["augment_flip"]) == (2, True)
        assert not torch.allclose(a.update, c.update, rtol=0, atol=1e-3)  # augmentation changed the training


def test_resnet_clients_vectorise_with_augmentation() -> None:
    """A narrow ResNet-18 (GroupNorm, no running statistics) trained by the vectorised engine on augmented
    CIFAR-sized batches gives each client's sequential update."""
    from flsec.fl.params import get_flat, set_flat
    from flsec.fl.vectorised import train_clients, unsupported_reason
    from flsec.models import InputSpec, build_model

    spec = InputSpec(3, 32, 32, 10, (0.5,) * 3, (0.25,) * 3)
    model = build_model("resnet18", spec, 0, width=4)
    assert unsupported_reason(model) is None
    local = LocalSpec(epochs=1, batch_size=4, lr=0.05, momentum=0.9, weight_decay=5e-4, augment_crop=4, augment_flip=True)
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in (6, 8)]
    starts = torch.stack([get_flat(model), get_flat(model) * 0.99])
    streams = [client_batches(x, y, local, torch.Generator().manual_seed(i)) for i, (x, y) in enumerate(data)]
    got = train_clients(model, starts, streams, [local.steps(len(y)) for _, y in data], local)
    for i, (x, y) in enumerate(data):
        ref = build_model("resnet18", spec, 0, width=4)
        set_flat(ref, starts[i])
        from flsec.fl.client import local_train_on

        want = local_train_on(ref, client_batches(x, y, local, torch.Generator().manual_seed(i)), local)
        assert torch.allclose(got[i].update, want.update, rtol=0, atol=1e-5), (i, (got[i].update - want.update).abs().max())


def test_capture_truth_replays_the_augmented_poisoned_batches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The scoring truth of an augmented attacker's update is the batches it trained on (augmented, then
    stamped): local training on them gives the captured update exactly."""
    from flsec.fl.checkpoint import load_checkpoint
    from flsec.fl.client import local_train_on
    from flsec.fl.engines import train
    from flsec.inversion.truth import capture_truth
    from tests.conftest import small_config

    out = tmp_path / "aug"
    train(small_config(training={"rounds": 1, "augment_crop": 1, "augment_flip": True}), out, progress=False)
    ckpt = load_checkpoint(out)
    tensors, meta = ckpt.capture(1, 0)
    assert (meta["augment_crop"], meta["augment_flip"]) == (1, True)
    x, y, poisoned = capture_truth(ckpt, 1, 0, "update", meta)
    assert poisoned.any() and (y[poisoned] == ckpt.config.attack.target_label).all()
    model = ckpt.build_model(ckpt.round_model_weights(1))
    spec = LocalSpec(1, meta["batch_size"], meta["lr"], meta["momentum"], meta["weight_decay"])
    batches = list(zip(x.split(meta["batch_size"]), y.split(meta["batch_size"]), strict=True))
    update = local_train_on(model, batches, spec).update * meta["boost_factor"]
    assert torch.allclose(update, tensors["update"], atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("engine", ["sequential", "vectorised"])
def test_augmented_resnet_round_on_cuda_agrees_with_cpu(tmp_path, engine: str) -> None:  # type: ignore[no-untyped-def]
    """The augmentation draws stay on the CPU generator, so a CUDA round trains on the same augmented batches
    as the CPU reference (a narrow ResNet-18, both engines)."""
    from flsec.fl.engines import CLIENT_ENGINES
    from flsec.fl.server import Server
    from tests.conftest import small_config

    cfg = small_config(model={"name": "resnet18", "width": 4},
                       training={"augment_crop": 2, "augment_flip": True, "num_clients": 4, "rounds": 1})
    replies = {}
    for device in ("cpu", "cuda"):
        run = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"device": device,
                                                                               "client_engine": engine})})
        server = Server(run, tmp_path / device)
        replies[device] = CLIENT_ENGINES.get(engine)(server.fed).run(server.begin_round(1))
    for a, b in zip(replies["cpu"], replies["cuda"], strict=True):
        assert float((a.update - b.update.cpu()).norm()) <= 1e-3 * max(float(a.update.norm()), 1e-6), a.client
