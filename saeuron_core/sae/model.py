"""TopK sparse autoencoder, the architecture SAeUron uses.

encode: ``z = topk(relu(W_enc (x - b_dec) + b_enc))`` per token;
decode: ``x_hat = sum_j z_j W_dec[idx_j] + b_dec``, computed as a sparse gather
(``embedding_bag``) over the k active rows, never a dense ``n_latents``-wide matmul.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``"float16"`` (or ``torch.float16``) -> ``torch.float16``; only float32/16/bfloat16."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ConfigError(f"unsupported dtype {name}; expected one of {sorted(_DTYPES)}")
        return name
    key = str(name).replace("torch.", "").lower()
    key = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}.get(key, key)
    if key not in _DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class SAEConfig:
    """Shape of an SAE and where it belongs.

    ``hook_point`` is the diffusers module path (e.g. ``up_blocks.1.attentions.1``) and
    ``model_family`` the model it was trained on (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``, ``demo``, ...).
    ``residual``: the SAE reads the block's update (output minus input) instead of its output; its edits
    are added onto the block output.
    """

    d_in: int
    n_latents: int
    k: int
    hook_point: str = ""
    model_family: str = ""
    normalize_decoder: bool = True
    residual: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_in", "n_latents", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"SAE config: {name} must be a positive integer, got {value!r}")
        if self.k > self.n_latents:
            raise ConfigError(f"SAE config: k ({self.k}) must not exceed n_latents ({self.n_latents})")
        if not isinstance(self.hook_point, str) or not isinstance(self.model_family, str):
            raise ConfigError("SAE config: hook_point and model_family must be strings")
        if not isinstance(self.normalize_decoder, bool) or not isinstance(self.extra, dict):
            raise ConfigError("SAE config: normalize_decoder must be true or false and extra a JSON object")
        if not isinstance(self.residual, bool):
            raise ConfigError(f"SAE config: residual must be true or false, got {self.residual!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"SAE config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        missing = {"d_in", "n_latents", "k"} - set(data)
        if missing:
            raise ConfigError(f"SAE config is missing {sorted(missing)}")
        kwargs = {key: value for key, value in data.items() if key in known}
        extra = kwargs.pop("extra", None) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"SAE config: extra must be a JSON object, got {extra!r}")
        extra = {**extra}
        extra.update({key: value for key, value in data.items() if key not in known})
        return cls(**kwargs, extra=extra)


class TopK(NamedTuple):
    """Sparse code: the k largest post-ReLU pre-activations per token and their latent ids."""

    values: Tensor
    indices: Tensor


def _single_device(tensors: Iterator[Tensor]) -> Optional[torch.device]:
    """The one real device all ``tensors`` are on, else ``None`` (several devices, or meta tensors)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return None
    (device,) = devices
    return None if device.type == "meta" else device


class TopKSAE(nn.Module):
    """TopK SAE with an ``nn.Linear`` encoder and unit-norm decoder rows ``W_dec [n_latents, d_in]``."""

    def __init__(self, config: SAEConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        # What the file around the weights carried; kept so that save(load(f)) loses nothing.
        self.training_summary: dict[str, Any] = {}
        self.concepts: dict[str, Any] = {}
        self.extra_tensors: dict[str, Tensor] = {}
        self.source_format = "new"
        self.encoder = nn.Linear(config.d_in, config.n_latents, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(self.encoder.weight.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(config.d_in, device=device, dtype=dtype))
        with torch.no_grad():
            self.encoder.bias.zero_()
            self.set_decoder_norm_to_unit_norm()

    # -- properties -----------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def n_latents(self) -> int:
        return self.config.n_latents

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def on_device(self, device: torch.device) -> "TopKSAE":
        """This SAE with every weight on ``device``: itself when they all are there, else a copy for one use.

        Nothing is kept: where the SAE lives is its host's decision (ComfyUI's memory manager may leave it, or part
        of it, offloaded), so an offloaded SAE is streamed to the activations for each call, never cached twice.
        """
        if all(p.device == device for p in self.parameters()):
            return self
        moved = TopKSAE(self.config, device="meta")
        moved.load_state_dict({k: v.detach().to(device) for k, v in self.state_dict().items()}, assign=True)
        moved.concepts, moved.extra_tensors = self.concepts, self.extra_tensors
        return moved

    @contextlib.contextmanager
    def kept_beside(self, module: nn.Module) -> Iterator["TopKSAE"]:
        """This SAE moved to ``module``'s device inside the block, and back on exit.

        Nothing moves when the module's weights are not on one real device (offloaded by accelerate) or when the
        SAE's weights are spread over several devices (a host's memory manager, e.g. ComfyUI's, placed them).
        """
        target = _single_device(module.parameters())
        home = _single_device(self.parameters())
        if target is None or home is None or target == home:
            yield self
            return
        self.to(target)
        try:
            yield self
        finally:
            self.to(home)

    # -- core maths ----------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            hook = f" (hook point {self.config.hook_point})" if self.config.hook_point else ""
            raise ConfigError(
                f"SAE expects activations with {self.d_in} channels{hook}, got a tensor of shape "
                f"{tuple(x.shape)} ({x.shape[-1]} channels); this SAE does not fit this model/block"
            )

    def pre_acts(self, x: Tensor) -> Tensor:
        """``relu(W_enc (x - b_dec) + b_enc)`` in the SAE's dtype, shape ``[..., n_latents]``."""
        self._check_input(x)
        x = x.to(device=self.device, dtype=self.dtype)
        return F.relu(F.linear(x - self.b_dec, self.encoder.weight, self.encoder.bias))

    def encode(self, x: Tensor) -> TopK:
        """Per-token top-k of the post-ReLU pre-activations; ``values``/``indices`` are ``[..., k]``."""
        values, indices = self.pre_acts(x).topk(self.k, dim=-1, sorted=False)
        return TopK(values, indices)

    def decode(self, values: Tensor, indices: Tensor, *, bias: bool = True) -> Tensor:
        """Sparse decode of ``[..., k]`` codes to ``[..., d_in]`` (SAE dtype)."""
        if values.shape != indices.shape:
            raise ConfigError(f"decode: values {tuple(values.shape)} and indices {tuple(indices.shape)} differ")
        lead = values.shape[:-1]
        flat_idx = indices.reshape(-1, indices.shape[-1]).to(self.device)
        flat_val = values.reshape(-1, values.shape[-1]).to(device=self.device, dtype=self.dtype)
        out = F.embedding_bag(flat_idx, self.W_dec, per_sample_weights=flat_val, mode="sum")
        if bias:
            out = out + self.b_dec
        return out.reshape(*lead, self.d_in)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``decode(encode(x))`` returned in the input's dtype and device."""
        code = self.encode(x)
        return self.decode(code.values, code.indices).to(device=x.device, dtype=x.dtype)

    def dense_codes(self, x: Tensor) -> Tensor:
        """Top-k codes scattered into a dense ``[..., n_latents]`` tensor (for inspection)."""
        code = self.encode(x)
        dense = torch.zeros(*code.values.shape[:-1], self.n_latents, device=self.device, dtype=self.dtype)
        return dense.scatter_(-1, code.indices, code.values)

    # -- decoder constraint ----------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row to unit L2 norm."""
        norm = self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)
        self.W_dec.div_(norm)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the gradient component along each (unit) decoder row, so steps keep the norm."""
        grad = self.W_dec.grad
        if grad is None:
            return
        # Row dot products as a batched matmul, then an in-place update: no [n_latents, d_in] temporaries.
        parallel = torch.bmm(grad.unsqueeze(1), self.W_dec.unsqueeze(2)).squeeze(2)
        grad.addcmul_(parallel, self.W_dec, value=-1)

    # -- construction helpers --------------------------------------------------------
    @classmethod
    def from_tensors(cls, config: SAEConfig, tensors: dict[str, Tensor], *,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TopKSAE":
        """Build from ``encoder.weight``, ``encoder.bias``, ``W_dec``, ``b_dec`` (shapes are checked)."""
        expected = {
            "encoder.weight": (config.n_latents, config.d_in),
            "encoder.bias": (config.n_latents,),
            "W_dec": (config.n_latents, config.d_in),
            "b_dec": (config.d_in,),
        }
        for name, shape in expected.items():
            if name not in tensors:
                raise ConfigError(f"SAE tensors: missing {name!r} (expected shape {list(shape)})")
            if tuple(tensors[name].shape) != shape:
                raise ConfigError(
                    f"SAE tensors: {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)} "
                    f"for d_in={config.d_in}, n_latents={config.n_latents}"
                )
        dtype = dtype or tensors["W_dec"].dtype
        with torch.device("meta"):
            sae = cls(config)
        sae = sae.to_empty(device=device or "cpu").to(dtype)
        with torch.no_grad():
            sae.encoder.weight.copy_(tensors["encoder.weight"])
            sae.encoder.bias.copy_(tensors["encoder.bias"])
            sae.W_dec.copy_(tensors["W_dec"])
            sae.b_dec.copy_(tensors["b_dec"])
        return sae

    def tensors(self) -> dict[str, Tensor]:
        """The four parameter tensors under their file names."""
        return {
            "encoder.weight": self.encoder.weight.detach(),
            "encoder.bias": self.encoder.bias.detach(),
            "W_dec": self.W_dec.detach(),
            "b_dec": self.b_dec.detach(),
        }


def fvu(x: Tensor, recon: Tensor) -> Tensor:
    """Fraction of variance unexplained: ``sum((recon-x)^2) / sum((x - mean(x))^2)`` over all tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    recon = recon.reshape(-1, recon.shape[-1]).float()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return (recon - x).pow(2).sum() / total.clamp_min(1e-12)


def auto_lr(n_latents: int) -> float:
    """sparsify's default learning rate for a TopK SAE of this width."""
    return 2e-4 / math.sqrt(n_latents / 2**14)
