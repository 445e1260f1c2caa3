"""Knowledge distillation with the shared trainer: a student trained towards a teacher's outputs.

`distill` is the recipe `lowbit distill` and `lowbit qat` run: the teacher's logits on each
training window (no gradient) against the student's, with `lowbit.training.losses.kd_loss`
(``α·T²·KL + (1−α)·CE``; ``α = 0`` is the no-teacher control: plain next-token CE, the teacher is
then not run at all), plus optionally `hidden_loss` between matched hidden states (the student's
block j against the teacher's block ``layer_map[j]``: a depth student's kept blocks). It
evaluates on held-out windows as it goes (`held_out`: KL(teacher ‖ student), the student's
perplexity and top-1 agreement), and resumes through the trainer's state folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.training.losses import ce_loss, hidden_loss, kd_loss
from lowbit.training.trainer import TrainConfig, Trainer, TrainResult


@dataclass(frozen=True)
class KDConfig:
    alpha: float = 1.0          # weight of the soft (teacher) term; 0 = plain CE, no teacher
    temperature: float = 1.0
    hidden: float = 0.0         # weight of the hidden-state matching term (0: off)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise LowbitError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise LowbitError(f"temperature must be positive, got {self.temperature}")
        if self.hidden < 0:
            raise LowbitError(f"the hidden-state loss weight must be >= 0, got {self.hidden}")


def _forward(model: nn.Module, x: Tensor, hidden: bool):
    out = model(input_ids=x, output_hidden_states=hidden, use_cache=False)
    return out.logits, (list(out.hidden_states[1:]) if hidden else [])


def kd_loss_fn(teacher: nn.Module | None, cfg: KDConfig, layer_map: list[int] | None = None):
    """The trainer's ``loss_fn(student, tokens)`` for this distillation."""
    if cfg.alpha > 0 and teacher is None:
        raise LowbitError("distillation with alpha > 0 needs a teacher")
    hidden = cfg.hidden > 0

    def loss_fn(student: nn.Module, x: Tensor):
        zs, hs = _forward(student, x, hidden)
        if cfg.alpha == 0 and not hidden:
            loss = ce_loss(zs, x)
            return loss, {"ce": float(loss.detach())}
        with torch.no_grad():
            zt, ht = _forward(teacher, x, hidden)
        loss, parts = kd_loss(zs, zt, x, cfg.alpha, cfg.temperature)
        if hidden:
            pick = layer_map if layer_map is not None else list(range(len(hs)))
            if len(pick) != len(hs) or max(pick) >= len(ht):
                raise LowbitError(f"hidden-state matching: {len(hs)} student blocks cannot be matched to the "
                                  f"teacher's {len(ht)} with map {pick}")
            h = hidden_loss(hs, [ht[j] for j in pick])
            loss = loss + cfg.hidden * h
            parts["hidden"] = float(h.detach())
        return loss, parts

    return loss_fn


@torch.no_grad()
def held_out(student: nn.Module, teacher: nn.Module | None, windows: Tensor, micro_batch: int = 2) -> dict:
    """KL(teacher ‖ student) per predicted token (nats), the student's perplexity and top-1
    agreement with the teacher on ``windows``."""
    nll = kl = agree = 0.0
    n = 0
    device = next(student.parameters()).device
    for i in range(0, windows.shape[0], micro_batch):
        x = windows[i:i + micro_batch].to(device)
        ls = F.log_softmax(student(input_ids=x, use_cache=False).logits[:, :-1].float(), -1)
        y = x[:, 1:]
        nll += float(-ls.gather(-1, y[..., None]).sum())
        if teacher is not None:
            lt = F.log_softmax(teacher(input_ids=x, use_cache=False).logits[:, :-1].float(), -1)
            kl += float((lt.exp() * (lt - ls)).sum())
            agree += float((lt.argmax(-1) == ls.argmax(-1)).sum())
        n += y.numel()
    out = {"ppl": math.exp(nll / n)}
    if teacher is not None:
        out.update(kl=kl / n, top1=agree / n)
    return out


def distill(student: nn.Module, teacher: nn.Module | None, params: dict[str, Tensor], windows: Tensor,
            eval_windows: Tensor | None, train: TrainConfig, kd: KDConfig, *, state_dir=None,
            resume: bool | None = None, device="cpu", progress: bool = True,
            layer_map: list[int] | None = None, evaluate=None) -> TrainResult:
    """Train ``params`` of ``student`` towards ``teacher`` (module docstring). Frozen: every other
    parameter of the student, and the whole teacher."""
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if evaluate is None and eval_windows is not None:
        mb = train.micro_batch or train.batch_size
        evaluate = lambda m: held_out(m, teacher, eval_windows, mb)  # noqa: E731
    trainer = Trainer(student, params, kd_loss_fn(teacher if kd.alpha > 0 or kd.hidden > 0 else None, kd, layer_map),
                      windows, train, state_dir=state_dir, evaluate=evaluate, device=device, progress=progress)
    try:
        return trainer.run(resume=resume)
    finally:
        for p in params.values():
            p.requires_grad_(False)


def norm_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The gains of every block's norms and of the final norm (the family record names them), by
    parameter name: trained beside a compressed student's layers."""
    from lowbit.models.families import family_of, find_blocks

    fam = family_of(model)
    out = {}
    for i, blk in enumerate(find_blocks(model)):
        for path in fam.norms.values():
            for n, p in blk.get_submodule(path).named_parameters():
                out[f"{fam.blocks}.{i}.{path}.{n}"] = p
    for n, p in model.get_submodule(fam.final_norm).named_parameters():
        out[f"{fam.final_norm}.{n}"] = p
    return out


def named_parameters_of(standins: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Every parameter of a set of stand-in modules, by ``<module name>.<parameter name>``."""
    return {f"{n}.{pn}": p for n, s in standins.items() for pn, p in s.named_parameters()}
