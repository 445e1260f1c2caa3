"""LLM.int8(): vector-wise int8 with mixed-precision outlier decomposition (Dettmers et al. 2022).

Weights: each output row of W is quantized to int8 with its own absmax scale (§3.1, vector-wise;
`lowbit.formats.int8.Int8Weight`). Activations are quantized on the fly, one absmax per token,
except the *outlier feature dimensions* — input dims in which some token of the current batch
reaches |x| ≥ threshold (6.0 in the paper) — which are multiplied in float (§3.2, eq. 7;
`lowbit.kernels.int8`). The quantization itself needs no data.

Calibration is used only to REPORT how many feature dims are outliers: for every linear layer
the runner shows us its inputs on the calibration text, and we count, per input dim, the
calibration tokens with |x| ≥ threshold. Recorded per layer (and saved in lowbit.json through
`describe()`):

* ``fraction``: the share of input dims that reach the threshold on at least one calibration
  token, i.e. the dims the kernel would treat as outliers if the whole calibration set were
  one batch (``dims`` is their number);
* ``value_fraction``: the share of all activation values with |x| ≥ threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.core.grid import check_finite
from lowbit.core.registry import register_method
from lowbit.formats.int8 import Int8Weight, validate_threshold
from lowbit.formats.base import WeightFormat


@dataclass(frozen=True)
class LLMInt8Config:
    threshold: float = 6.0  # |x| ≥ threshold marks an outlier feature dim (paper: 6.0); inf = pure int8

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", validate_threshold(self.threshold))


def llm_int8_quantize(W: Tensor, cfg: LLMInt8Config) -> Int8Weight:
    """Pure solver: W [out, in] -> row-wise absmax int8 weight carrying the outlier threshold."""
    return Int8Weight.quantize(W.detach().float(), cfg.threshold)


def outlier_counts(x: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Per input dim, the number of tokens (rows of x [..., in]) with |x| ≥ threshold (int64 [in]),
    and the number of tokens (int64 scalar)."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    return (x2.abs() >= threshold).sum(dim=0), torch.tensor(x2.shape[0], dtype=torch.int64, device=x.device)


def outlier_report(counts: Tensor, n_tokens: int) -> dict:
    """Summary of one layer's counts: outlier dims, their share, and the share of outlier values."""
    dims = int((counts > 0).sum())
    n_in = counts.numel()
    return {"dims": dims, "in_features": n_in, "fraction": dims / n_in,
            "value_fraction": float(counts.sum()) / (n_in * n_tokens) if n_tokens else 0.0}


@register_method("llm-int8")
class LLMInt8(Method):
    config_cls = LLMInt8Config
    needs_calibration = True  # only to report outlier fractions; the weights need no data
    layer_records = ("outliers",)

    def __init__(self, config: LLMInt8Config):
        super().__init__(config)
        self._pending: dict[str, list[Tensor]] = {}  # layer -> [counts [in], n_tokens], not yet applied
        self.outliers: dict[str, dict] = {}            # layer -> outlier_report(...)

    def observe(self, layer_name: str, module: nn.Linear, x: Tensor) -> None:
        counts, n = outlier_counts(x, self.config.threshold)
        if layer_name in self._pending:
            self._pending[layer_name][0] += counts
            self._pending[layer_name][1] += n
        else:
            self._pending[layer_name] = [counts, n]

    def statistics(self) -> dict[str, Tensor]:
        # only layers of the current block: earlier ones were already reduced and applied
        return {f"{name}.{k}": t for name, (c, n) in self._pending.items() for k, t in (("counts", c), ("tokens", n))}

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        check_finite(module.weight, layer_name)
        if layer_name in self._pending:
            counts, n = self._pending.pop(layer_name)
            self.outliers[layer_name] = outlier_report(counts.cpu(), int(n))
        with torch.no_grad():
            fmt = llm_int8_quantize(module.weight, self.config)
        return fmt

    def describe(self) -> dict:
        d = super().describe()
        d["outliers"] = dict(summarize(self.outliers), per_layer=self.outliers)
        return d


def summarize(per_layer: dict[str, dict]) -> dict:
    """Mean and max of the per-layer outlier-dim fractions, and the layer with the max."""
    if not per_layer:
        return {"layers": 0}
    fr = {k: v["fraction"] for k, v in per_layer.items()}
    worst = max(fr, key=fr.get)
    return {"layers": len(fr), "mean_fraction": sum(fr.values()) / len(fr), "max_fraction": fr[worst],
            "max_layer": worst, "layers_with_outliers": sum(v > 0 for v in fr.values())}
