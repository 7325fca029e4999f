"""One training step of a TopK SAE: a dense encoder matmul only to select latents, then loss and gradients
computed on the selected (token, latent) pairs (see :mod:`.trainer` for the loss and the distributed sums)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import distributed
from ..data.distributed import DistInfo
from ..sae.model import TopKSAE
from .config import TrainConfig


def device_type(device: str | torch.device) -> str:
    return torch.device(device).type


class _Pairs:
    """``[B, c]`` (token, latent) pairs held latent-major (CSR over latents) for the sparse products.

    Every product a TopK step needs beyond the one dense selection matmul touches only these
    ``B * c`` pairs: per-pair dot products (sampled dense-dense matmul), per-latent weighted sums
    of token rows (``embedding_bag`` over the latent-major order) and per-latent scalar sums.
    """

    def __init__(self, indices: Tensor, n_latents: int, dtype: torch.dtype) -> None:
        self.shape = indices.shape
        self.n_latents = n_latents
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat, stable=True)
        self.latents = flat[self.order]
        self.tokens = self.order // indices.shape[1]
        self.crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
        torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=self.crow[1:])
        self.mask = self._csr(torch.zeros_like(flat, dtype=dtype))

    def _csr(self, values: Tensor) -> Tensor:
        """The sparse ``[n_latents, B]`` matrix with ``values`` (latent-major order) at the pairs."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.tokens, values, size=(self.n_latents, self.shape[0]),
                                           check_invariants=False)

    def dots(self, weight: Tensor, rows: Tensor) -> Tensor:
        """``[B, c]``: ``weight[latent] . rows[token]`` for every pair."""
        out = torch.empty_like(self.mask.values())
        out[self.order] = torch.sparse.sampled_addmm(self.mask, weight, rows.t(), beta=0.0).values()
        return out.view(self.shape)

    def row_sums(self, rows: Tensor, weights: Tensor, out: Tensor) -> Tensor:
        """``out [n_latents, d]``: for each latent, the ``weights``-weighted sum of its pairs' token ``rows``."""
        return torch.addmm(out, self._csr(weights.reshape(-1)[self.order]), rows, beta=0.0, out=out)

    def latent_sums(self, weights: Tensor, out: Tensor) -> Tensor:
        """``out [n_latents]``: for each latent, the sum of its pairs' ``weights``."""
        return out.zero_().index_add_(0, self.latents, weights.reshape(-1)[self.order])


def resolve_select_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the selection matmul: ``auto`` is bfloat16 where the hardware multiplies it
    natively (CUDA, CPUs with AVX512-BF16 or AMX), float32 elsewhere."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        native = any(getattr(torch.cpu, probe, lambda: False)()
                     for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return torch.bfloat16 if native else torch.float32
    return torch.float32


class TrainStep:
    """One training step of a TopK SAE, the one :func:`train_sae` runs, with a sparse backward.

    The loss is the module docstring's; its gradient is written out by hand because all of it
    but one matmul is sparse. Selection: ``x_c = x - b_dec`` times ``W_enc`` (the only dense
    ``[B, n_latents]`` product, in row chunks, never kept, no gradient) picks candidate latents
    per token; their pre-activations are recomputed exactly in float32 as per-pair dot products
    and the top ``k`` of those are the code. A float32 selection picks ``k`` candidates, i.e.
    exactly ``topk(relu(pre_acts(x)))``. A bfloat16 selection (about 2.5x faster on CPUs with
    native bf16) picks ``k + max(8, k // 2)``, so the code differs from float32's only when
    rounding pushes one of the true top ``k`` below all of those (measured: at most 1 token in
    4096 per step, FVU equal to 6 digits); the values are float32 either way.

    Backward: only the ``B * k`` selected pairs carry gradient, so the gradients of ``W_enc``,
    ``W_dec``, ``b_enc`` and the code are per-pair products (:class:`_Pairs`), and that of
    ``b_dec`` through ``x_c`` is ``-grad(b_enc) @ W_enc``. AuxK works on the dead latents only,
    densely in float32: four matmuls over ``n_dead`` latents, ``4 * n_dead / n_latents`` of an
    encode. Then the decoder-parallel gradient is removed, gradients clipped, and Adam steps
    (the decoder is renormalised at the start of each step).

    Under ``torch.distributed`` (``dist`` enabled) ``x`` is this rank's rows of the global
    batch; see the module docstring for what is global.
    """

    def __init__(self, sae: TopKSAE, opt: torch.optim.Optimizer, since_fired: Tensor, config: TrainConfig,
                 dist: Optional[DistInfo] = None) -> None:
        self.sae, self.opt, self.since_fired, self.config = sae, opt, since_fired, config
        self.dist = dist if dist is not None and dist.enabled else None
        self.select_dtype = resolve_select_dtype(config.select_dtype, sae.device)
        self.candidates = sae.k if self.select_dtype == sae.dtype else min(sae.k + max(8, sae.k // 2), sae.n_latents)
        self._w_select: Optional[Tensor] = None  # W_enc in the selection dtype, refreshed in place every step
        # One buffer, kept across steps, for the gradients and (for the all-reduce) the step's statistics:
        # a fresh parameter-sized tensor every step costs as much in page faults as the sparse products.
        params = (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec)
        sizes = [p.numel() for p in params] + [3, sae.n_latents]
        self._flat = torch.zeros(sum(sizes), dtype=sae.dtype, device=sae.device)
        *views, self._stats, self._fired = self._flat.split(sizes)
        self._grads = [v.view_as(p) for v, p in zip(views, params)]

    def _select(self, xc: Tensor) -> Tensor:
        """``[B, candidates]`` latent ids with the largest pre-activations (selection dtype, row chunks)."""
        weight, bias = self.sae.encoder.weight, self.sae.encoder.bias
        if self.select_dtype != weight.dtype:
            if self._w_select is None or self._w_select.shape != weight.shape:
                self._w_select = torch.empty_like(weight, dtype=self.select_dtype)
            weight = self._w_select.copy_(weight)
            bias, xc = bias.to(self.select_dtype), xc.to(self.select_dtype)
        # Row chunks of about 8M pre-activations: the block stays in cache for the top-k.
        parts = max(1, -(-xc.shape[0] * self.sae.n_latents // (1 << 23)))
        return torch.cat([F.linear(rows, weight, bias).topk(self.candidates, dim=-1, sorted=False).indices
                          for rows in xc.tensor_split(parts)])

    @property
    def buffers(self) -> list[Tensor]:
        """The tensors this step keeps between calls besides the SAE and the optimizer state (the
        gradient buffer and the selection copy of ``W_enc``), for memory accounting."""
        return [t for t in (self._flat, self._w_select) if t is not None]

    def __call__(self, x: Tensor, lr: float) -> dict[str, float]:
        """Train on the batch ``x`` (this rank's rows) at learning rate ``lr``; returns its metrics."""
        sae, config, dist = self.sae, self.config, self.dist
        n_global = x.shape[0] * (dist.world_size if dist else 1)
        sae.set_decoder_norm_to_unit_norm()
        w_enc, b_enc, w_dec, b_dec = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
        dead = self.since_fired > config.dead_tokens_threshold
        n_dead = int(dead.sum())
        with torch.no_grad():
            mean = distributed.all_reduce_sum(x.sum(dim=0), dist) / n_global if dist else x.mean(dim=0)
            total_var = distributed.all_reduce_sum((x - mean).pow(2).sum().reshape(1), dist)[0].clamp_min(1e-12)
            xc = x - b_dec
            indices = self._select(xc)
            pairs = _Pairs(indices, sae.n_latents, x.dtype)
            values = pairs.dots(w_enc, xc) + b_enc[indices]
            if self.candidates > sae.k:
                values, pick = values.topk(sae.k, dim=-1, sorted=False)
                indices = indices.gather(1, pick)
                pairs = _Pairs(indices, sae.n_latents, x.dtype)
            values.clamp_min_(0)
            err = F.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum").add_(b_dec).sub_(x)
            err_sum = err.pow(2).sum()

            # Gradients of (sum err^2 + alpha * AuxK) / total_var.
            grad_w_enc, grad_b_enc, grad_w_dec, grad_b_dec = self._grads
            grad_err = err * (2 / total_var)
            grad_code = pairs.dots(w_dec, grad_err).mul_(values > 0)
            pairs.row_sums(grad_err, values, out=grad_w_dec)
            pairs.row_sums(xc, grad_code, out=grad_w_enc)
            pairs.latent_sums(grad_code, out=grad_b_enc)
            aux = torch.zeros((), device=x.device)
            if n_dead and config.auxk_alpha > 0:
                aux = self._auxk(xc, err, dead, n_dead, total_var)
            torch.sub(grad_err.sum(dim=0), grad_b_enc @ w_enc, out=grad_b_dec)
            self._stats.copy_(torch.stack([err_sum, aux.to(err_sum.dtype), (values > 0).sum().to(err_sum.dtype)]))
            self._fired.zero_()[indices[values > 0]] = 1
            if dist:  # one all-reduce for gradients, loss numerators, L0 and fired latents
                distributed.all_reduce_sum(self._flat, dist)
            for param, grad in zip((w_enc, b_enc, w_dec, b_dec), self._grads):
                param.grad = grad
            stats = self._stats.tolist()
            fired = self._fired > 0
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            self.since_fired += n_global
            self.since_fired[fired] = 0
        fvu, auxk = stats[0] / float(total_var), stats[1] / float(total_var)
        return {"loss": fvu + config.auxk_alpha * auxk, "fvu": fvu, "auxk": auxk, "l0": stats[2] / n_global,
                "dead_frac": n_dead / sae.n_latents, "lr": lr}

    def _auxk(self, xc: Tensor, err: Tensor, dead: Tensor, n_dead: int, total_var: Tensor) -> Tensor:
        """AuxK's numerator (the top ``d_in // 2`` dead latents' reconstruction of the residual
        ``-err``, scaled down while few are dead); adds its gradients into the step's."""
        sae, alpha = self.sae, self.config.auxk_alpha
        grad_w_enc, grad_b_enc, grad_w_dec, _ = self._grads
        k_aux = min(sae.d_in // 2, n_dead)
        scale = min(n_dead / (sae.d_in // 2), 1.0)
        ids = dead.nonzero().squeeze(1)
        w_enc, w_dec = sae.encoder.weight[ids], sae.W_dec[ids]
        values, local = F.relu(F.linear(xc, w_enc, sae.encoder.bias[ids])).topk(k_aux, dim=-1, sorted=False)
        diff = F.embedding_bag(local, w_dec, per_sample_weights=values, mode="sum").add_(err)
        numerator = scale * diff.pow(2).sum()
        grad_diff = diff.mul_(2 * alpha * scale / total_var)
        code = torch.zeros(xc.shape[0], n_dead, dtype=xc.dtype, device=xc.device).scatter_(1, local, values)
        grad_w_dec.index_add_(0, ids, code.t() @ grad_diff)
        grad_code = (grad_diff @ w_dec.t()).mul_(code > 0)
        grad_w_enc.index_add_(0, ids, grad_code.t() @ xc)
        grad_b_enc.index_add_(0, ids, grad_code.sum(dim=0))
        return numerator
