"""Inversion methods behind a registry: ``geiping`` (Inverting Gradients) and ``dlg`` (Deep
Leakage from Gradients). Each takes a case, the batch labels and an image shape, and returns
the best reconstruction found. Ctrl-C stops the optimisation and returns the best so far, flagged
``interrupted`` (the caller decides what to keep; ``flsec invert`` discards it and stops).

Where the optimisation runs (``InversionSettings.space``):

* ``pixel`` (flsec's default): the variable is the image in [0, 1] itself, initialised uniformly
  (``init = "uniform"``), boxed to [0, 1]; TV is measured on pixels.
* ``normalised``: the variable is the model's standardised input z = (x - mean) / std, as in the
  authors' code (inversefed's ``GradientReconstructor``: ``randn`` init, box
  [-mean/std, (1 - mean)/std], TV on z). The signed-Adam step size and the TV weight then act on
  z, so ``lr = 0.1`` there is a step of 0.1 * std in pixels. This is the setting of their Table 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from flsec.inversion.cases import Case, cosine_distance
from flsec.inversion.labels import LABEL_STRATEGIES
from flsec.inversion.metrics import total_variation
from flsec.registry import Registry


@dataclass(frozen=True)
class InversionSettings:
    """How to invert: the optimisation (``iterations`` ... ``init``) and, for FedAvg updates:

    * ``max_images``: most candidates; an update over more images is inverted into that many by a
      surrogate replay of ``surrogate_steps`` steps (0: as many as the client took);
    * ``label_strategy``: ``llg`` or ``bias-corrected`` (:mod:`flsec.inversion.labels`);
    * ``boost_correction``: ``norm`` divides the update by its norm-ratio estimate when that exceeds
      ``boost_threshold`` before label counts are read (:mod:`flsec.inversion.boost`)."""

    iterations: int = 2000
    restarts: int = 1
    lr: float = 0.1
    tv_weight: float = 1e-4
    seed: int = 0
    progress: bool = True
    space: str = "pixel"
    init: str = "uniform"
    max_images: int = 16
    surrogate_steps: int = 0
    label_strategy: str = "llg"
    boost_correction: str = "norm"
    boost_threshold: float = 3.0

    def __post_init__(self) -> None:
        for name, low in (("iterations", 1), ("restarts", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        for name, positive in (("lr", True), ("tv_weight", False), ("boost_threshold", True)):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
                raise ValueError(f"{name}: must be a finite number {'>' if positive else '>='} 0, got {value}")
        if self.surrogate_steps < 0:
            raise ValueError(f"surrogate_steps: must be >= 0 (0: the client's own), got {self.surrogate_steps}")
        if self.max_images < 1:
            raise ValueError(f"max_images: must be >= 1, got {self.max_images}")
        if self.label_strategy not in LABEL_STRATEGIES:
            raise ValueError(f"label_strategy: unknown '{self.label_strategy}'; allowed: {', '.join(LABEL_STRATEGIES)}")
        if self.boost_correction not in ("norm", "none"):
            raise ValueError(f"boost_correction: unknown '{self.boost_correction}'; allowed: norm, none")
        if self.space not in SPACES:
            raise ValueError(f"space: unknown '{self.space}'; allowed: {', '.join(SPACES)}")
        if self.init not in INITS:
            raise ValueError(f"init: unknown '{self.init}'; allowed: {', '.join(INITS)}")


SPACES = ("pixel", "normalised")
INITS = ("uniform", "normal")


@dataclass(frozen=True)
class Box:
    """x = mean + std * z per channel; z is what the method optimises (identity in pixel space)."""

    mean: torch.Tensor  # 1 x C x 1 x 1
    std: torch.Tensor

    @classmethod
    def for_space(cls, space: str, channels: int, stats: tuple[tuple[float, ...], tuple[float, ...]] | None,
                  device: torch.device) -> Box:
        if space == "pixel" or stats is None:
            ones = torch.ones(1, channels, 1, 1, device=device)
            return cls(ones * 0.0, ones)
        m, sd = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in stats)
        return cls(m.expand(1, channels, 1, 1).clone(), sd.expand(1, channels, 1, 1).clone())

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * z

    def project_(self, z: torch.Tensor) -> None:
        z.copy_(torch.maximum(torch.minimum(z, (1.0 - self.mean) / self.std), -self.mean / self.std))

    def initial(self, shape: tuple[int, ...], init: str, g: torch.Generator) -> torch.Tensor:
        """Seeded start (drawn on the CPU, so every device starts from the same images)."""
        if init == "uniform":
            return (torch.rand(shape, generator=g).to(self.mean.device) - self.mean) / self.std
        return torch.randn(shape, generator=g).to(self.mean.device)


@dataclass
class InversionOutput:
    images: torch.Tensor
    loss: float
    restart_losses: list[float] = field(default_factory=list)
    iterations_done: int = 0
    interrupted: bool = False
    seconds: float = 0.0


Method = Callable[..., InversionOutput]  # (case, labels, shape, settings, *, stats=None) -> InversionOutput
METHODS: Registry[Method] = Registry("inversion method")


Step = Callable[[], float]


def _restarts(shape: tuple[int, ...], s: InversionSettings, desc: str, box: Box,
              make_step: Callable[[torch.Tensor], Step]) -> InversionOutput:
    """Run ``s.restarts`` optimisations from seeded starts; each iteration calls the step returned
    by ``make_step(z)`` (which updates ``z`` in place and returns the objective before the update).
    Keeps the best iterate (in pixels, [0, 1]) of the best restart; Ctrl-C returns the best so far
    with ``interrupted`` set."""
    device = box.mean.device
    best = InversionOutput(torch.rand(shape).to(device), float("inf"))
    bar = tqdm(total=s.iterations * s.restarts, desc=desc, disable=not s.progress, dynamic_ncols=True)
    try:
        for restart in range(s.restarts):
            g = torch.Generator().manual_seed(s.seed * 1000 + restart)
            z = box.initial(shape, s.init, g).requires_grad_(True)
            step = make_step(z)
            run_best, run_x = float("inf"), box.pixels(z.detach()).clamp(0.0, 1.0)
            try:
                for _ in range(s.iterations):
                    before = z.detach().clone()
                    value = step()
                    if value == value and value < run_best:  # NaN never wins
                        run_best, run_x = value, box.pixels(before).clamp(0.0, 1.0)
                    best.iterations_done += 1
                    bar.update(1)
                    if best.iterations_done % 25 == 0:
                        bar.set_postfix(loss=f"{value:.4g}", restart=restart)
            finally:
                best.restart_losses.append(run_best)
                if run_best < best.loss:
                    best.images, best.loss = run_x, run_best
    except KeyboardInterrupt:
        best.interrupted = True
    bar.close()
    return best


@METHODS.register("geiping")
def geiping(case: Case, labels: torch.Tensor, shape: tuple[int, ...], s: InversionSettings, *,
            stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> InversionOutput:
    """Inverting Gradients (Geiping, Bauermeister, Dröge & Moeller, NeurIPS 2020, eq. 4 and Sec. 4):
    minimise 1 - cos(grad(x), g) + alpha TV(x) over x in the data box [0, 1], with Adam on the
    *sign* of the gradient, step decay (x0.1 at 3/8, 5/8 and 7/8 of the iterations) and several
    random restarts, keeping the restart of least loss. ``stats`` (the data's per-channel mean and
    std) is used when ``s.space == "normalised"``."""
    box = Box.for_space(s.space, shape[1], stats, case.observed.device)
    labels = labels.to(case.observed.device)

    def make_step(z: torch.Tensor) -> Step:
        opt = torch.optim.Adam([z], lr=s.lr)
        milestones = [int(s.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

        def step() -> float:
            rec = cosine_distance(case.simulate(box.pixels(z), labels), case.observed)
            loss = rec + s.tv_weight * total_variation(z)
            (grad,) = torch.autograd.grad(loss, [z])
            z.grad = grad.sign()
            opt.step()
            sched.step()
            with torch.no_grad():
                box.project_(z)
            return float(rec.detach())

        return step

    return _restarts(shape, s, "invert geiping", box, make_step)


@METHODS.register("dlg")
def dlg(case: Case, labels: torch.Tensor, shape: tuple[int, ...], s: InversionSettings, *,
        stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> InversionOutput:
    """Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019, Algorithm 1): L-BFGS on the
    squared L2 distance between simulated and observed gradients. With labels from iDLG (Zhao
    et al. 2020) instead of jointly optimised soft labels, this is iDLG. Each iteration is one
    L-BFGS step of up to 20 function evaluations; the output is clipped to [0, 1]."""
    scale = float(case.observed.norm()) ** 2 or 1.0
    box = Box.for_space(s.space, shape[1], stats, case.observed.device)
    labels = labels.to(case.observed.device)

    def make_step(z: torch.Tensor) -> Step:
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            diff = case.simulate(box.pixels(z), labels) - case.observed
            loss = (diff * diff).sum() / scale
            loss.backward(inputs=[z])
            return loss

        return lambda: float(opt.step(closure).detach())

    return _restarts(shape, s, "invert dlg", box, make_step)
