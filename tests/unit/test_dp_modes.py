"""DP-SGD's cheaper engines change the cost, never the mechanism: per-sample gradient norms are exact,
and a ghost-clipping step is the hooks step (same clipping, same sum) on the same batch."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clinfed.tasks.base import Task
from clinfed.tasks.segmentation import Segmentation3DTask, SegmentationTask
from clinfed.training import PerSampleCriterion


def _tiny_unet(task: Task, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return task.build_model()


def _per_sample_norms_by_loop(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(task.loss(model(x[i : i + 1]), y[i : i + 1]), params)
        norms.append(torch.sqrt(sum((g**2).sum() for g in grads)))
    return torch.stack(norms)


CASES = [
    pytest.param(SegmentationTask(image_size=16, channels=(4, 8), strides=(2,)), (5, 1, 16, 16), id="unet2d"),
    pytest.param(Segmentation3DTask(image_size=8, channels=(2, 4), strides=(2,)), (3, 1, 8, 8, 8), id="unet3d"),
]


@pytest.mark.parametrize("task,shape", CASES)
def test_per_sample_gradient_norms_are_exact_in_hooks_and_ghost_modes(task, shape):
    """Both engines (with clinfed.per_sample_grads' conv, transposed-conv and PReLU samplers) give each
    image the gradient norm it has alone in the batch; the batch's B images differ, so a mix-up shows."""
    torch.manual_seed(1)
    x = torch.rand(*shape)
    y = (torch.rand(*shape) > 0.6).float()
    model = _tiny_unet(task)
    want = _per_sample_norms_by_loop(task, model, x, y)
    assert float(want.std()) > 1e-3 * float(want.mean())  # distinct norms: a permutation would fail

    hooks = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    task.loss(hooks(x), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    got_hooks = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in params))
    hooks._close()
    torch.testing.assert_close(got_hooks, want, rtol=1e-4, atol=1e-7)

    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = _tiny_unet(task)
    ghost = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0)
    loss = PerSampleCriterion(task)(ghost(x), y)
    loss.backward()
    torch.testing.assert_close(ghost.get_norm_sample(), want, rtol=1e-4, atol=1e-7)


def _one_private_step(task: Task, mode: str, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """One DP-SGD step with noise 0 on the whole batch, through `make_private` as a site does it."""
    model = _tiny_unet(task, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    private = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        criterion=PerSampleCriterion(task),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    wrapped, dp_optimizer = private[0], private[1]
    dp_optimizer.zero_grad()
    out = wrapped(x)
    loss = private[2](out, y) if mode == "ghost" else task.loss(out, y)
    loss.backward()
    dp_optimizer.step()
    return [p.detach().clone() for p in wrapped._module.parameters()]


@pytest.mark.parametrize("task,shape", CASES)
def test_a_ghost_step_equals_the_hooks_step_and_clipping_is_applied(task, shape):
    torch.manual_seed(2)
    x = torch.rand(*shape)
    y = (torch.rand(*shape) > 0.6).float()
    model = _tiny_unet(task, seed=3)
    norms = _per_sample_norms_by_loop(task, model, x, y)
    clip = float(norms.min() + norms.max()) / 2  # some samples are clipped, some are not
    assert float(norms.max()) > 1.02 * clip > 1.02 * float(norms.min())
    hooks = _one_private_step(task, "hooks", x, y, clip)
    ghost = _one_private_step(task, "ghost", x, y, clip)
    for h, g in zip(hooks, ghost, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)
    # The step is exactly DP-SGD's (noise 0, lr 1): the mean over samples of each gradient scaled to at
    # most `clip`, built here by a loop over single samples.
    params = list(model.parameters())
    want = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(task.loss(model(x[i : i + 1]), y[i : i + 1]), params)
        scale = min(1.0, clip / (float(norms[i]) + 1e-6))
        for w, g in zip(want, grads, strict=True):
            w += scale * g / len(x)
    for p, h, w in zip(params, hooks, want, strict=True):
        torch.testing.assert_close(p.detach() - h, w, rtol=1e-4, atol=1e-7)


def test_per_sample_loss_means_to_the_batch_loss():
    """Ghost clipping reweights per-sample losses: their mean must be the loss the hooks mode uses."""
    from clinfed.tasks.breast_cancer import BreastCancerTask

    torch.manual_seed(0)
    seg = SegmentationTask(image_size=16)
    out, target = torch.randn(4, 2, 16, 16), (torch.rand(4, 1, 16, 16) > 0.7).float()
    assert seg.per_sample_loss(out, target).shape == (4,)
    torch.testing.assert_close(seg.per_sample_loss(out, target).mean(), seg.loss(out, target))
    tab = BreastCancerTask()
    logits, labels = torch.randn(7), (torch.rand(7) > 0.5).float()
    torch.testing.assert_close(tab.per_sample_loss(logits, labels).mean(), tab.loss(logits, labels))
    # the generic fallback (one call per sample) agrees with the vectorised one
    torch.testing.assert_close(Task.per_sample_loss(seg, out, target), seg.per_sample_loss(out, target))


@pytest.mark.parametrize("task,shape", CASES)
def test_a_step_in_chunks_is_the_whole_batch_step(task, shape):
    """hooks_backward in chunks of 2 (the last one smaller) gives the very step of one pass, and Opacus
    sees one batch (one accountant step, divided once by the expected batch size)."""
    from clinfed.training import hooks_backward

    torch.manual_seed(4)
    x = torch.rand(*shape)
    y = (torch.rand(*shape) > 0.6).float()
    steps = []
    for chunk in (0, 2):
        model = _tiny_unet(task, seed=5)
        engine = PrivacyEngine()
        wrapped, optimizer, _ = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
            noise_multiplier=0.0,
            max_grad_norm=0.5,
            poisson_sampling=False,
        )
        optimizer.zero_grad()
        loss = hooks_backward(wrapped, task, x, y, chunk)
        optimizer.step()
        assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == 1
        assert engine.accountant.history[0][1] == pytest.approx(1.0)  # the sample rate, not 3×
        steps.append((float(loss), [p.detach().clone() for p in wrapped._module.parameters()]))
    (loss_whole, whole), (loss_chunks, chunked) = steps
    assert loss_chunks == pytest.approx(loss_whole, rel=1e-5)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
