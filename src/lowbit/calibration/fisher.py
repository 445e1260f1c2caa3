"""What a layer's weight error costs the whole model: the statistics of one pass over calibration
text that turn a weight error ΔW into a predicted KL divergence (used by `lowbit.auto`).

For a linear layer y = W x, an error ΔW changes y by δy_t = ΔW x_t at every token t. To second
order, the KL divergence of the model's next-token distributions (mean over positions) from the
original's is

    KL ≈ ½ · mean_t E_y[(g_tᵀ δy_t)²],    g_t = ∂ Σ_s log p(y_s) / ∂ y_t,   y_s ~ p(· | text)

(the Fisher information of the output distribution pulled back to the layer's output; labels are
*sampled from the model itself*, so E_y[g gᵀ] is the true Fisher, not the empirical one).
Keeping the output channels' Fisher diagonal and treating g and x as independent gives

    KL ≈ ½ · Σ_r f_r · (ΔW H ΔWᵀ)_rr,     f_r = mean_t E[g_{t,r}²],   H = mean_t x_t x_tᵀ

H carries the input correlations (what GPTQ minimises) and f which output channels the rest of the
network listens to. One pass collects both for every layer: H with forward hooks, f with hooks on
the layers' output gradients after a backward pass of the sampled log-likelihood. The token
embedding is a layer too: its output is the row of the token read (times the family's embedding
scale), so its f is collected the same way and its "H" is the tokens' frequency.

The hooks live here, with the rest of the calibration code; the model is run whole (memory: the
model, one batch's activations and gradients, and one H per distinct layer input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError


@dataclass
class LayerStats:
    """H = mean x xᵀ [in, in] (float64; None for the embedding), f = mean g² per output channel
    [out] (float64), tokens = how many positions were averaged; for the embedding, ``counts``
    [vocab] = how often each token was read and ``scale`` the factor the model multiplies rows by."""

    f: Tensor
    tokens: int
    H: Tensor | None = None
    counts: Tensor | None = None
    scale: float = 1.0


def embedding_scale(module: nn.Module) -> float:
    """The factor a family's embedding module multiplies the rows it reads by (Gemma: √d), else 1."""
    s = getattr(module, "embed_scale", None)
    if s is None:
        return 1.0
    return float(s.item() if isinstance(s, Tensor) else s)


def layer_statistics(model: nn.Module, layers: dict[str, nn.Module], samples: Tensor, *,
                     embedding: str | None = None, draws: int = 1, seed: int = 0, batch_size: int = 1,
                     progress: bool = True) -> dict[str, LayerStats]:
    """`LayerStats` of every ``nn.Linear`` in ``layers`` (key -> module) and, when ``embedding``
    names a key, of the model's input embedding under that key, over ``samples`` ([n, L] ids).

    Each batch is run ``draws`` times with labels sampled from the model's own next-token
    distribution (seeded by ``seed``); the model's parameters get no gradients."""
    if samples.dim() != 2 or samples.shape[1] < 2:
        raise LowbitError(f"calibration samples must be [n, L >= 2] token ids, got {tuple(samples.shape)}")
    if draws < 1:
        raise LowbitError(f"draws must be >= 1, got {draws}")
    for k, mod in layers.items():
        if not isinstance(mod, nn.Linear):
            raise LowbitError(f"{k}: layer statistics need a float nn.Linear, got {type(mod).__name__}")
    emb = model.get_input_embeddings() if embedding is not None else None
    H: dict[str, Tensor] = {}
    f: dict[str, Tensor] = {}
    counts = None
    last_in: dict[int, tuple] = {}  # id of an input tensor seen this batch -> its x xᵀ (q/k/v share one)
    tokens = 0
    collect_H = [True]  # H is the same in every draw: collected in the first only

    def fwd(mod, args, out, key):
        if not collect_H[0]:
            return
        x = args[0].detach()
        k = id(x)
        if k not in last_in or last_in[k][0] is not x:  # (the tensor is kept, so its id is not reused)
            X = x.reshape(-1, x.shape[-1]).float()
            last_in[k] = (x, (X.T @ X).double())
        xxT = last_in[k][1]
        H[key] = H[key] + xxT if key in H else xxT.clone()

    def bwd(mod, grad_in, grad_out, key):
        g = grad_out[0].detach().reshape(-1, grad_out[0].shape[-1]).double()
        s = (g * g).sum(0)
        f[key] = f[key] + s if key in f else s

    handles = []
    for key, mod in layers.items():
        handles.append(mod.register_forward_hook(lambda m, a, o, k=key: fwd(m, a, o, k)))
        handles.append(mod.register_full_backward_hook(lambda m, gi, go, k=key: bwd(m, gi, go, k)))
    def emb_out(mod, args, out):
        # the parameters need no gradient, so the hidden states get one from here on
        out.requires_grad_(True)
        if emb is not None:
            out.register_hook(lambda g: bwd(mod, None, (g,), embedding))
        return out

    handles.append(model.get_input_embeddings().register_forward_hook(emb_out))
    gen = torch.Generator().manual_seed(int(seed))
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    n_batches = -(-samples.shape[0] // batch_size)
    bar = tqdm(total=n_batches * draws, desc="layer statistics", unit="pass", disable=not progress, leave=False)
    try:
        for i in range(0, samples.shape[0], batch_size):
            ids = samples[i:i + batch_size]
            tokens += ids.numel()
            if emb is not None:
                c = torch.bincount(ids.reshape(-1), minlength=emb.num_embeddings).double()
                counts = c if counts is None else counts + c
            for d in range(draws):
                collect_H[0] = d == 0
                last_in.clear()
                with torch.enable_grad():
                    logits = model(input_ids=ids, use_cache=False).logits.float()
                    lp = torch.log_softmax(logits, dim=-1)
                    with torch.no_grad():
                        y = torch.multinomial(lp.detach().exp().reshape(-1, lp.shape[-1]), 1, generator=gen)
                    loss = lp.reshape(-1, lp.shape[-1]).gather(1, y).sum()
                    if not torch.isfinite(loss):
                        raise LowbitError("the model's log-likelihood on the calibration text is not finite")
                    loss.backward()
                bar.update(1)
    finally:
        bar.close()
        for hd in handles:
            hd.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    out = {}
    for key in layers:
        if key not in H or key not in f:
            raise LowbitError(f"{key} was not run by the model's forward pass; it cannot be measured")
        out[key] = LayerStats(f=f[key] / (tokens * draws), tokens=tokens, H=H[key] / tokens)
    if emb is not None:
        out[embedding] = LayerStats(f=f[embedding] / (tokens * draws), tokens=tokens, counts=counts,
                                    scale=embedding_scale(emb))
    return out
