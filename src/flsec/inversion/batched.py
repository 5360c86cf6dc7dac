"""Many gradient captures inverted in one vectorised optimisation (torch.func).

One-by-one, every capture runs its own optimisation loop, and on a small model each iteration is
dominated by per-call overhead (dispatch, autograd bookkeeping, tiny kernels). Here K captures are
optimised at once: ``torch.func.vmap`` maps one capture's objective over

* the model weights (captures of different rounds were taken on different global weights, so the
  parameters and buffers are stacked, K x ...),
* the observed gradients (K x d), the labels (K x B) and the dummy images (K x B x C x H x W).

The objective of one capture is exactly :func:`flsec.inversion.methods.geiping`'s: 1 - cos(grad, g)
+ alpha TV (Geiping et al. 2020, eq. 4) with the simulated gradient taken by ``torch.func.grad``
(the inner gradient, kept differentiable) and the step by a second ``grad`` over the images. The
optimiser is a single ``torch.optim.Adam`` over the stacked K x B x C x H x W images with the same
step-decay schedule: Adam is element-wise, so each capture keeps its own moments and the update of
each capture is the one it would get alone. Starts are drawn from the same seeded generator as the
one-by-one path, and every step evaluates the same objective and gradient as the one-by-one path up
to float rounding (``tests/test_inversion_batched.py`` checks that, step by step). The trajectories
themselves are not reproducible across kernels: Adam on the *sign* of the gradient turns a rounding
difference in a near-zero coordinate into a full step, so after many iterations the batched and the
one-by-one reconstruction of a capture (or the same path on two CPUs) may sit in different minima.

What cannot be vectorised falls back to one-by-one, with the reason in the metrics
(:func:`batch_blocker`): another method than ``geiping`` (L-BFGS line searches differ per
capture), FedAvg updates (a differentiable replay of several local steps), a model with batch
norm or dropout in train mode (per-batch statistics), captures of different kinds or shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from flsec.inversion.cases import Case, GradientCase, cosine_distance
from flsec.inversion.methods import Box, InversionOutput, InversionSettings
from flsec.inversion.metrics import total_variation

BATCHED_METHODS = ("geiping",)
# inversion.batch_captures / --batch-captures: one by one unless asked. On a 2-core CPU batching 10-20 MNIST CNN
# captures measured only 1.2-1.3x (benchmarks/results/inversion_batched.md), below what would justify leaving the
# reference path; on a GPU, where one capture leaves the device idle, ask for more.
DEFAULT_BATCH_CAPTURES = 1


def batch_blocker(case: Case, method: str) -> str | None:
    """Why ``case`` cannot join a vectorised batch (None: it can)."""
    if method not in BATCHED_METHODS:
        return f"method '{method}' has no vectorised path (allowed: {', '.join(BATCHED_METHODS)})"
    if not isinstance(case, GradientCase):
        return "update inversion replays several local steps"
    stateful = [type(m).__name__ for m in case.model.modules()
                if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))]
    if stateful:
        return f"the model has {stateful[0]} in train mode"
    return None


def batch_key(case: GradientCase) -> tuple[object, ...]:
    """Captures with equal keys can share one vectorised optimisation."""
    shapes = tuple((n, tuple(p.shape)) for n, p in case.model.named_parameters())
    buffers = tuple((n, tuple(b.shape)) for n, b in case.model.named_buffers())
    return (type(case.model).__name__, case.batch_size, shapes, buffers, case.observed.numel(),
            str(case.observed.device))


def _stack(cases: Sequence[GradientCase]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {n: torch.stack([c.params[n].detach() for c in cases]) for n in cases[0].params}
    buffers = {n: torch.stack([dict(c.model.named_buffers())[n] for c in cases]) for n, _ in
               cases[0].model.named_buffers()}
    return params, buffers


def objective_gradients(cases: Sequence[GradientCase], labels: Sequence[torch.Tensor], box: Box,
                        tv_weight: float) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``z`` (K x B x C x H x W) -> (the gradient of each case's objective with respect to its own
    images, each case's reconstruction term 1 - cos): one vmapped evaluation of the objective of
    :func:`flsec.inversion.methods.geiping` per case, on that case's weights, gradient and labels."""
    model = cases[0].model
    names = list(cases[0].params)
    params, buffers = _stack(cases)
    observed = torch.stack([c.observed.detach() for c in cases])
    ys = torch.stack([y.to(observed.device) for y in labels])

    def objective(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], z: torch.Tensor, y: torch.Tensor,
                  g_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = box.pixels(z)

        def ce(q: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, (q, b), (x,)), y)

        g = grad(ce)(p)
        rec = cosine_distance(torch.cat([g[n].reshape(-1) for n in names]), g_obs)
        return rec + tv_weight * total_variation(z), rec

    step_grad = vmap(grad(objective, argnums=2, has_aux=True))
    return lambda z: step_grad(params, buffers, z, ys, observed)


def geiping_batched(cases: Sequence[GradientCase], labels: Sequence[torch.Tensor], shape: tuple[int, ...],
                    s: InversionSettings, *, stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                    on_iteration: Callable[[int], None] | None = None) -> list[InversionOutput]:
    """:func:`flsec.inversion.methods.geiping` on K gradient cases at once (see the module docstring).

    ``shape`` is one capture's image shape (B x C x H x W); ``labels[k]`` are case k's B labels.
    Returns one output per case, best restart each. Ctrl-C raises KeyboardInterrupt (a batch
    stopped half-way holds no finished reconstruction)."""
    device = cases[0].observed.device
    box = Box.for_space(s.space, shape[1], stats, device)
    step_grad = objective_gradients(cases, labels, box, s.tv_weight)
    k = len(cases)
    outs = [InversionOutput(torch.empty(0), float("inf")) for _ in range(k)]
    for restart in range(s.restarts):
        g0 = torch.Generator().manual_seed(s.seed * 1000 + restart)
        start = box.initial(shape, s.init, g0)  # every case starts where it would alone
        z = start.unsqueeze(0).repeat(k, *([1] * len(shape))).contiguous()
        opt = torch.optim.Adam([z], lr=s.lr)
        milestones = [int(s.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        run_best = torch.full((k,), float("inf"), device=device)
        run_x = box.pixels(z).clamp(0.0, 1.0)
        for it in range(s.iterations):
            before = z.clone()
            dz, rec = step_grad(z)
            z.grad = dz.sign()
            opt.step()
            sched.step()
            with torch.no_grad():
                box.project_(z)
            better = rec < run_best  # NaN never wins
            run_best = torch.where(better, rec, run_best)
            run_x[better] = box.pixels(before[better]).clamp(0.0, 1.0)
            if on_iteration is not None:
                on_iteration(restart * s.iterations + it + 1)
        for i, out in enumerate(outs):
            value = float(run_best[i])
            out.restart_losses.append(value)
            out.iterations_done += s.iterations
            if value < out.loss:
                out.images, out.loss = run_x[i].clone(), value
    for i, out in enumerate(outs):
        if out.images.numel() == 0:  # never finite: the caller reports the capture as diverged
            out.images = run_x[i].clone()
    return outs
