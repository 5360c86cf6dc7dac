"""Local training of many clients at once: one ``torch.func`` program over a stack of client models.

:func:`train_clients` runs the arithmetic of :func:`flsec.fl.client.local_train_on` (cross-entropy,
SGD with momentum and weight decay, PyTorch's update rule) for a chunk of clients in lock step:
``vmap(grad(loss))`` evaluates every client's gradient on its own weights and its own batch in one
call (a convolution with per-client weights becomes one grouped convolution), then one SGD step
updates the stacked weights.

Clients differ in data size, so in batch sizes (the last batch of an epoch) and in step counts:

* a step's batches are padded to the largest one and padded samples get weight 0 in a weighted mean
  of the per-sample losses, which equals the mean over the real samples;
* a client whose steps are done leaves the stack (its final weights are kept), so finished clients
  cost nothing; sorting a round's clients by step count before chunking keeps such exits rare.

Each client's batches are its own :func:`flsec.fl.client.client_batches` stream (same seed, same
order, same poisoning), pulled one batch per step, so a client gets exactly the batches it gets in the
sequential engine. Models with batch-norm statistics or dropout are not vectorised (their training
state or randomness is not per client); :func:`unsupported_reason` says why.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from flsec.fl.client import LocalResult, LocalSpec
from flsec.runtime import autocast

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained by :func:`train_clients` (None when it can)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "it has batch-norm running statistics"
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return "it has dropout"
    return None


def _pad(batches: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-client batches into (C, B, ...) images, labels and 0/1 sample weights, padding to the largest."""
    size = max(len(y) for _, y in batches)
    x0 = batches[0][0]
    x = x0.new_zeros((len(batches), size, *x0.shape[1:]))
    y = torch.zeros(len(batches), size, dtype=torch.long)
    w = torch.zeros(len(batches), size)
    for i, (xb, yb) in enumerate(batches):
        x[i, : len(yb)] = xb
        y[i, : len(yb)] = yb
        w[i, : len(yb)] = 1.0
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), w.to(device, non_blocking=True)


def train_clients(model: nn.Module, starts: torch.Tensor, streams: Sequence[Batches], steps: Sequence[int],
                  spec: LocalSpec, precision: str = "fp32") -> list[LocalResult]:
    """Train ``len(streams)`` clients from the flat weights ``starts`` (C x d) over their batch streams.

    ``model`` gives the architecture (its parameters are not touched); client ``i`` runs ``steps[i]``
    SGD steps on the first ``steps[i]`` batches of ``streams[i]``. Returns each client's update
    (local - start), mean batch loss and step count, as :func:`~flsec.fl.client.local_train_on` does.
    """
    device = next(model.parameters()).device
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = {n: b.to(device) for n, b in model.named_buffers()}
    was_training = model.training
    model.train()

    starts = starts.to(device)
    c = len(streams)
    params = {n: t.reshape(c, *s).clone() for n, t, s in zip(names, starts.split(sizes, dim=1), shapes, strict=True)}
    momenta = {n: torch.zeros_like(p) for n, p in params.items()} if spec.momentum else {}

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, precision):
            logits = functional_call(model, (p, buffers), (x,))
        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        loss = (per_sample * w).sum() / w.sum()
        return loss, loss.detach()

    step_fn = vmap(grad(loss_fn, has_aux=True))
    live = list(range(c))  # original index of each row of the stack
    remaining = list(steps)
    losses = torch.zeros(c, device=device)
    finals: dict[int, dict[str, torch.Tensor]] = {}
    done = [i for i in live if remaining[i] <= 0]
    if done:
        params, momenta, live = _drop(params, momenta, live, done, finals)

    while live:
        x, y, w = _pad([next(streams[i]) for i in live], device)
        grads, loss = step_fn(params, x, y, w)
        _sgd_step(params, grads, momenta, spec)
        index = torch.tensor(live, device=device)
        losses.index_add_(0, index, loss.detach().float())
        for i in live:
            remaining[i] -= 1
        done = [i for i in live if remaining[i] == 0]
        if done:
            params, momenta, live = _drop(params, momenta, live, done, finals)

    model.train(was_training)
    results = []
    for i in range(c):
        final = torch.cat([finals[i][n].reshape(-1) for n in names])
        results.append(LocalResult(final - starts[i], float(losses[i]) / max(steps[i], 1), max(steps[i], 0)))
    return results


def _sgd_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], momenta: dict[str, torch.Tensor],
              spec: LocalSpec) -> None:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) on stacked weights: ``d = g + wd * p``;
    ``b = mu * b + d`` (``b = d`` on the first step, the same as starting from ``b = 0``); ``p -= lr * b``."""
    for n, p in params.items():
        d = grads[n]
        if spec.weight_decay:
            d = d.add(p, alpha=spec.weight_decay)
        if spec.momentum:
            d = momenta[n].mul_(spec.momentum).add_(d)
        p.add_(d, alpha=-spec.lr)


def _drop(params: dict[str, torch.Tensor], momenta: dict[str, torch.Tensor], live: list[int], done: list[int],
          finals: dict[int, dict[str, torch.Tensor]]
          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[int]]:
    """Keep the final weights of the clients in ``done`` and remove them from the stack."""
    rows = {i: r for r, i in enumerate(live)}
    for i in done:
        finals[i] = {n: p[rows[i]].clone() for n, p in params.items()}
    finished = set(done)
    keep = [r for r, i in enumerate(live) if i not in finished]
    if not keep:
        return {}, {}, []
    idx = torch.tensor(keep, dtype=torch.long, device=next(iter(params.values())).device)
    return ({n: p.index_select(0, idx) for n, p in params.items()},
            {n: b.index_select(0, idx) for n, b in momenta.items()},
            [live[r] for r in keep])
