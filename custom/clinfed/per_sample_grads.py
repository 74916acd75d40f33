"""Exact per-sample gradients for the imaging jobs' layers, cheaper than Opacus' defaults.

Why this exists: `clinfed bench dp` showed DP-SGD on the MONAI UNets costing 1.4-2× the time of
non-private training, and the time went not to the clipping or the noise but to how Opacus 1.6
obtains per-sample gradients of three layer types:

- `Conv2d` / `Conv3d`: Opacus unfolds each layer's input (im2col: Cin × k^d copies of every activation)
  and contracts it with an einsum; the unfolded tensor is the memory peak of a DP step.
- `ConvTranspose2d` / `ConvTranspose3d` and `PReLU`: Opacus has no sampler and falls back to functorch,
  which re-runs the layer's forward and backward under `vmap` for every batch.

Ghost clipping (`grad_sample_mode="ghost"`) does not help here: Opacus ships ghost *norm* samplers only
for `Linear` and `Embedding`; every other layer still materialises its per-sample gradient, and the
mode adds a second backward pass. The per-sample gradients of these UNets are small (12 k parameters
× 32 images = 1.5 MB); what costs is computing them. (DP-SGD's extra *memory* is mostly glibc's heap
fragmenting under Poisson batches of changing size: docs/benchmarks.md.)

So we compute them with the kernel PyTorch already uses for the weight gradient of a convolution,
`aten.convolution_backward`, run once as a *grouped* convolution: the batch is folded into the channel
axis (B samples × Cin channels as B·Cin channels, the weight repeated B times, groups multiplied by B),
and the grouped weight gradient is, block by block, each sample's own gradient. No im2col copy, no
vmap, one call per layer. PReLU's gradient is closed-form: Σ over positions of grad_out · min(x, 0).

These are registered with Opacus' own extension point (`register_grad_sampler`) when
`clinfed.training` is imported, so "hooks" and "ghost" modes both use them; they are exact (unit
tests compare them with one backward pass per sample). Layers with string padding ("same") or
anything else unusual go back to Opacus' own sampler.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from torch import nn

CONV = (nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose2d, nn.ConvTranspose3d)


def _grouped_weight_grad(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Per-sample weight gradients [B, *weight.shape] from one grouped `convolution_backward` call."""
    batch = x.shape[0]
    weight = layer.weight
    folded_x = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    folded_g = grad_out.reshape(1, batch * grad_out.shape[1], *grad_out.shape[2:])
    folded_w = weight.detach().repeat(batch, *([1] * (weight.dim() - 1)))
    output_padding = tuple(layer.output_padding) if transposed else (0,) * (weight.dim() - 2)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        folded_g,
        folded_x,
        folded_w,
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        transposed,
        list(output_padding),
        layer.groups * batch,
        [False, True, False],
    )
    return grad_w.reshape(batch, *weight.shape)


def _plain(layer: nn.Module) -> bool:
    """Our grouped route covers integer padding and zero padding mode; the rest goes to Opacus."""
    return not isinstance(layer.padding, str) and getattr(layer, "padding_mode", "zeros") == "zeros"


def _conv_samples(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor, transposed: bool) -> dict:
    out = {}
    if layer.weight.requires_grad:
        x = activations[0].to(backprops.dtype)
        out[layer.weight] = _grouped_weight_grad(layer, x, backprops, transposed)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.flatten(2).sum(2)
    return out


@register_grad_sampler(list(CONV))
def conv_grad_sample(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    if not _plain(layer) or activations[0].shape[0] == 0:
        return compute_conv_grad_sample(layer, activations, backprops)
    return _conv_samples(layer, activations, backprops, transposed=False)


@register_grad_sampler(list(CONV_TRANSPOSE))
def conv_transpose_grad_sample(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    if not _plain(layer) or activations[0].shape[0] == 0:
        return ft_compute_per_sample_gradient(layer, activations, backprops)
    return _conv_samples(layer, activations, backprops, transposed=True)


@register_grad_sampler(nn.PReLU)
def prelu_grad_sample(layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """out = max(0, x) + w · min(0, x), so ∂out/∂w = min(0, x), summed over positions (and channels
    when one slope is shared)."""
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    contrib = backprops * x.clamp(max=0)
    if layer.weight.numel() == 1:
        grad = contrib.flatten(1).sum(1, keepdim=True)
    else:
        grad = contrib.flatten(2).sum(2) if contrib.dim() > 2 else contrib
    return {layer.weight: grad.reshape(x.shape[0], *layer.weight.shape)}
