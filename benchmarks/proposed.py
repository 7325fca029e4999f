"""Prototype of the proposed training-step fix, measured by ``benchmarks.training_throughput``.

``saeuron_core.training._train_step`` differentiates through ``pre_acts(x).topk(k)``: autograd keeps
the dense ``[batch, n_latents]`` pre-activations and back-propagates a dense, almost all-zero
gradient through the encoder, i.e. two more ``batch x d_in x n_latents`` matmuls (grad of W_enc and
of the input) on top of the forward one. Only ``k`` of the ``n_latents`` entries per token have a
gradient, so the backward is sparse:

* grad of the input: ``embedding_bag(indices, W_enc, per_sample_weights=g)``;
* grad of ``W_enc``: for each latent, the ``g``-weighted sum of the tokens that selected it:
  ``embedding_bag(token_ids sorted by latent, x, offsets=per-latent starts, per_sample_weights=g)``;
* grad of ``b_enc``: ``index_add_`` of ``g``.

The dense forward runs under ``no_grad`` in row chunks, so the ``[batch, n_latents]`` tensor never
lives whole, and the ReLU is applied after the top-k to the k values only (ReLU is monotonic). The
optimizer is ``torch.optim.Adam(..., fused=True)`` (one fused kernel instead of a dozen passes over
the 2 x 26M parameters and their moments). Same maths, same numbers up to float summation order. Nothing here is imported by
``saeuron_core``; it exists to measure the fix before it is applied there.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from saeuron_core.sae import TopKSAE
from saeuron_core.training import TrainConfig


class GatheredEncoder(torch.autograd.Function):
    """``relu(x @ W.T + b)`` at the given ``[N, k]`` latent ids, with a sparse backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, indices, values > 0)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, indices, positive = ctx.saved_tensors
        g = (grad * positive).to(weight.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=g, mode="sum")
        flat = indices.flatten()
        if ctx.needs_input_grad[1]:
            order = flat.argsort()
            counts = torch.bincount(flat, minlength=weight.shape[0])
            offsets = counts.cumsum(0) - counts
            rows = order // indices.shape[1]
            grad_w = F.embedding_bag(rows, x, offsets, per_sample_weights=g.flatten()[order], mode="sum")
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=g.dtype, device=g.device).index_add_(0, flat, g.flatten())
        return grad_x, grad_w, grad_b, None, None


def sparse_encode(sae: TopKSAE, x: Tensor, dead: Optional[Tensor] = None, k_aux: int = 0,
                  chunk: int = 1024) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Top-k (and AuxK top-``k_aux`` over ``dead`` latents) values with gradients, indices without."""
    xc = x - sae.b_dec
    top_v, top_i, aux_v, aux_i = [], [], [], []
    with torch.no_grad():
        for part in xc.detach().split(chunk):
            # relu is monotonic: top-k first, then relu on the k values only (not on the dense tensor).
            pre = F.linear(part, sae.encoder.weight, sae.encoder.bias)
            v, i = pre.topk(sae.k, dim=-1, sorted=False)
            top_v.append(v.clamp_min_(0))
            top_i.append(i)
            if dead is not None and k_aux:
                v, i = pre.masked_fill_(~dead, -math.inf).topk(k_aux, dim=-1, sorted=False)
                aux_v.append(v.clamp_min_(0))
                aux_i.append(i)
    values, indices = torch.cat(top_v), torch.cat(top_i)
    values = GatheredEncoder.apply(xc, sae.encoder.weight, sae.encoder.bias, values, indices)
    if not aux_i:
        return values, indices, None, None
    av, ai = torch.cat(aux_v), torch.cat(aux_i)
    return values, indices, GatheredEncoder.apply(xc, sae.encoder.weight, sae.encoder.bias, av, ai), ai


def train_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: Tensor, since_fired: Tensor, config: TrainConfig,
               lr: float) -> dict[str, float]:
    """``saeuron_core.training._train_step`` with :func:`sparse_encode`; everything else is unchanged."""
    sae.set_decoder_norm_to_unit_norm()
    dead = since_fired > config.dead_tokens_threshold
    n_dead = int(dead.sum())
    k_aux = min(sae.d_in // 2, n_dead) if n_dead and config.auxk_alpha > 0 else 0
    values, indices, aux_values, aux_indices = sparse_encode(sae, x, dead if k_aux else None, k_aux)
    recon = sae.decode(values, indices)
    total_var = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    fvu = (recon - x).pow(2).sum() / total_var
    auxk = torch.zeros((), device=x.device)
    if aux_values is not None:
        scale = min(n_dead / (sae.d_in // 2), 1.0)
        residual = (x - recon).detach()
        e_hat = sae.decode(aux_values, aux_indices, bias=False)
        auxk = scale * (e_hat - residual).pow(2).sum() / total_var
    loss = fvu + config.auxk_alpha * auxk

    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()

    with torch.no_grad():
        fired = torch.zeros_like(dead)
        fired[indices[values > 0]] = True
        since_fired += x.shape[0]
        since_fired[fired] = 0
    return {"loss": float(loss.detach()), "fvu": float(fvu.detach()), "auxk": float(auxk.detach()),
            "l0": float((values > 0).sum(-1).float().mean()), "dead_frac": n_dead / sae.n_latents, "lr": lr}
