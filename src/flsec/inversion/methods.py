"""Inversion methods behind a registry: ``geiping`` (Inverting Gradients) and ``dlg`` (Deep
Leakage from Gradients). Each takes a case, the batch labels and an image shape, and returns
the best reconstruction found; Ctrl-C stops early and keeps the best so far."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from flsec.inversion.cases import Case, cosine_distance
from flsec.inversion.metrics import total_variation
from flsec.registry import Registry


@dataclass(frozen=True)
class InversionSettings:
    iterations: int = 2000
    restarts: int = 1
    lr: float = 0.1
    tv_weight: float = 1e-4
    seed: int = 0
    progress: bool = True


@dataclass
class InversionOutput:
    images: torch.Tensor
    loss: float
    restart_losses: list[float] = field(default_factory=list)
    iterations_done: int = 0
    interrupted: bool = False


Method = Callable[[Case, torch.Tensor, tuple[int, ...], InversionSettings], InversionOutput]
METHODS: Registry[Method] = Registry("inversion method")


Step = Callable[[], float]


def _restarts(shape: tuple[int, ...], s: InversionSettings, desc: str,
              make_step: Callable[[torch.Tensor], Step]) -> InversionOutput:
    """Run ``s.restarts`` optimisations from seeded uniform noise; each iteration calls the step
    returned by ``make_step(x)`` (which updates ``x`` in place and returns the objective before the
    update). Keeps the best iterate of the best restart; Ctrl-C returns the best so far."""
    best = InversionOutput(torch.rand(shape), float("inf"))
    bar = tqdm(total=s.iterations * s.restarts, desc=desc, disable=not s.progress, dynamic_ncols=True)
    try:
        for restart in range(s.restarts):
            x = torch.rand(shape, generator=torch.Generator().manual_seed(s.seed * 1000 + restart)).requires_grad_(True)
            step = make_step(x)
            run_best, run_x = float("inf"), x.detach().clone()
            try:
                for _ in range(s.iterations):
                    before = x.detach().clone()
                    value = step()
                    if value == value and value < run_best:  # NaN never wins
                        run_best, run_x = value, before.clamp(0.0, 1.0)
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
def geiping(case: Case, labels: torch.Tensor, shape: tuple[int, ...], s: InversionSettings) -> InversionOutput:
    """Inverting Gradients (Geiping, Bauermeister, Dröge & Moeller, NeurIPS 2020, eq. 4 and Sec. 4):
    minimise 1 - cos(grad(x), g) + alpha TV(x) over x in the data box [0, 1], with Adam on the
    *sign* of the gradient, step decay (x0.1 at 3/8, 5/8 and 7/8 of the iterations) and several
    random restarts, keeping the restart of least loss."""

    def make_step(x: torch.Tensor) -> Step:
        opt = torch.optim.Adam([x], lr=s.lr)
        milestones = [int(s.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

        def step() -> float:
            rec = cosine_distance(case.simulate(x, labels), case.observed)
            loss = rec + s.tv_weight * total_variation(x)
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad.sign()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
            return float(rec.detach())

        return step

    return _restarts(shape, s, "invert geiping", make_step)


@METHODS.register("dlg")
def dlg(case: Case, labels: torch.Tensor, shape: tuple[int, ...], s: InversionSettings) -> InversionOutput:
    """Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS 2019, Algorithm 1): L-BFGS on the
    squared L2 distance between simulated and observed gradients. With labels from iDLG (Zhao
    et al. 2020) instead of jointly optimised soft labels, this is iDLG. Each iteration is one
    L-BFGS step of up to 20 function evaluations; the output is clipped to [0, 1]."""
    scale = float(case.observed.norm()) ** 2 or 1.0

    def make_step(x: torch.Tensor) -> Step:
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            diff = case.simulate(x, labels) - case.observed
            loss = (diff * diff).sum() / scale
            loss.backward(inputs=[x])
            return loss

        return lambda: float(opt.step(closure).detach())

    return _restarts(shape, s, "invert dlg", make_step)
