"""Zeroth-order (SPSA) probes: directional derivatives of per-sample losses from forward passes.

``d(z) = (f(θ + hξ; z) − f(θ − hξ; z)) / 2h ≈ ∇f(θ; z)·ξ`` over the trainable parameters, with
``f`` the engine's per-sample mean token loss. Directions ξ are regenerated from a seed per
(selection, direction, parameter name), so they are the same on every rank and never stored; the
step is relative, ``h = epsilon x rms(θ)``, and every perturbed value is formed from a saved copy
of θ, which is written back bit-exactly at the end. Under DeepSpeed ZeRO-3 the perturbation is
added to the outputs of the trainable linear layers instead of their sharded weights. The
forwards go through the scoring engine (sharded, gathered on every rank). The derivation, the
choice of ``epsilon`` and its measured errors are in ``docs/selectors/zeroth.md``.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..seeding import derive_seed
from .engine import Batch, ScoringEngine, eval_mode
from .gradients import UnsupportedParameters, per_sample_gradients, trainable_linears
from .losses import supervised_loss_sums
from .optimizer_state import is_partitioned_param

logger = logging.getLogger("dataflex")

HALF_PRECISION_EPSILON = 1e-2  # smallest relative step that beat rounding noise in fp16 / bf16 forwards (bench)
Direction = Callable[[int, str, torch.Tensor], torch.Tensor]  # (param position, name, param) -> fp32 ξ slice


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every parameter with ``requires_grad``, in ``named_parameters`` order."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to perturb")
    return params


def full_shape(param: torch.Tensor) -> torch.Size:
    return torch.Size(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


@contextmanager
def gathered(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Every ZeRO-3 parameter of ``params`` in full for the block (read only; a collective)."""
    parts = [p for p in params if is_partitioned_param(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=None):
        yield


def compute_dtype(model: torch.nn.Module) -> str | None:
    """``"torch.float16"`` / ``"torch.bfloat16"`` when the frozen weights are half precision, else None."""
    for _, p in model.named_parameters():
        if not p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            return str(p.dtype)
    return None


def direction_seed(seed: int, selection: int, k: int, name: str) -> int:
    """A 63-bit generator seed for direction ``k`` of parameter ``name`` at a selection."""
    return derive_seed("zeroth", seed, selection, k, name)


def gaussian_direction(seed: int, selection: int, k: int) -> Direction:
    """Direction ``k``: i.i.d. N(0, 1) float32 entries, regenerated from the seed on every call."""

    def make(_: int, name: str, param: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(direction_seed(seed, selection, k, name))
        return torch.randn(full_shape(param), generator=gen, dtype=torch.float32).to(param.device)

    return make


def parameter_rms(params: Sequence[tuple[str, torch.Tensor]]) -> float:
    total, count = 0.0, 0
    with gathered([p for _, p in params]):
        for _, p in params:
            total += float(p.detach().double().pow(2).sum())
            count += p.numel()
    return math.sqrt(total / max(count, 1))


class Perturbation:
    """Holds a copy of the trainable parameters; sets θ0 + scale·ξ; restores θ0 bit-exactly.

    Use as a context manager: the original values are written back on exit, errors included.
    """

    def __init__(self, params: Sequence[tuple[str, torch.nn.Parameter]]):
        self.params = list(params)
        self.backup = [p.detach().clone() for _, p in self.params]

    @torch.no_grad()
    def apply(self, direction: Direction, scale: float) -> None:
        for i, ((name, p), orig) in enumerate(zip(self.params, self.backup)):
            xi = direction(i, name, p)
            p.copy_((orig.float() + scale * xi).to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for (_, p), orig in zip(self.params, self.backup):
            p.copy_(orig)

    def __enter__(self) -> "Perturbation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def output_linears(model: torch.nn.Module) -> list:
    """The trainable linear layers the output path works through (every trainable parameter must be in one)."""
    try:
        return trainable_linears(model)
    except UnsupportedParameters as err:
        raise ValueError(f"zeroth under DeepSpeed ZeRO-3 perturbs linear layers only: {err}") from None


class OutputPerturbation:
    """θ0 + scale·ξ through the outputs of the trainable linear layers; θ itself is never written.

    A forward hook on each trainable ``nn.Linear`` adds ``F.linear(x, scale·ξ_W, scale·ξ_b)`` to
    its output. Used where the parameters are partitioned (DeepSpeed ZeRO-3); same interface
    and context-manager use as :class:`Perturbation` (the hooks go on exit).
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[tuple[str, torch.nn.Parameter]]):
        self.params = list(params)
        position = {name: i for i, (name, _) in enumerate(self.params)}
        targets = output_linears(model)
        self.delta: list[torch.Tensor | None] = [None] * len(self.params)
        self.handles = []
        for t in targets:
            w = position[t.weight_name] if t.weight_name is not None else None
            b = position[t.bias_name] if t.bias_name is not None else None
            self.handles.append(t.module.register_forward_hook(self._hook(w, b), with_kwargs=True))

    def _hook(self, w: int | None, b: int | None) -> Callable:
        def hook(module, args, kwargs, output):
            dw = self.delta[w] if w is not None else None
            db = self.delta[b] if b is not None else None
            if dw is None and db is None:
                return None
            if dw is None:
                return output + db.to(output.dtype)
            x = args[0] if args else kwargs["input"]
            return output + torch.nn.functional.linear(x.to(dw.dtype), dw, db).to(output.dtype)
        return hook

    @torch.no_grad()
    def apply(self, direction: Direction, scale: float) -> None:
        for i, (name, p) in enumerate(self.params):
            self.delta[i] = direction(i, name, p).float() * scale

    def restore(self) -> None:
        self.delta = [None] * len(self.params)

    def __enter__(self) -> "OutputPerturbation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class ProbeCost:
    """Work done by a probe so far: sample forwards (all ranks), batch forwards / backwards on this rank."""

    sample_forwards: int = 0
    rank_forwards: int = 0
    rank_backwards: int = 0


class ZerothOrderProbe:
    """Finite differences of per-sample losses along shared directions, through a :class:`ScoringEngine`."""

    def __init__(self, engine: ScoringEngine, epsilon: float = 1e-3, via_outputs: bool | None = None):
        """``via_outputs``: perturb through layer outputs (:class:`OutputPerturbation`) instead of
        in place; ``None`` chooses it exactly when the parameters are partitioned (ZeRO-3)."""
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.engine = engine
        self.epsilon = epsilon
        self.params = trainable_parameters(engine.model)
        self.num_params = sum(full_numel(p) for _, p in self.params)
        self.partitioned = any(is_partitioned_param(p) for _, p in self.params)
        self.via_outputs = self.partitioned if via_outputs is None else bool(via_outputs)
        if self.partitioned and not self.via_outputs:
            raise ValueError("partitioned (ZeRO-3) parameters cannot be perturbed in place")
        self.cost = ProbeCost()
        self.rms = float("nan")  # set by step()
        if engine.rank == 0 and not self.via_outputs:
            low = sorted({str(p.dtype) for _, p in self.params if p.dtype not in (torch.float32, torch.float64)})
            if low:
                logger.warning("[DataFlex] zeroth: trainable parameters in %s: perturbations are rounded to that "
                               "precision (consider a larger epsilon, or float32 trainable weights)", ", ".join(low))
        if engine.rank == 0:
            half = compute_dtype(engine.model)
            if half is not None and epsilon < HALF_PRECISION_EPSILON:
                logger.warning("[DataFlex] zeroth: the model computes in %s; with epsilon %g the differences are "
                               "dominated by rounding - epsilon %g or larger is advised (docs/selectors/zeroth.md)",
                               half, epsilon, HALF_PRECISION_EPSILON)

    def step(self) -> float:
        """The absolute step h = epsilon x rms(θ) (epsilon when θ is all zeros)."""
        with self.engine.agreement.section("zeroth: parameter RMS"):  # a gather under ZeRO-3
            self.rms = parameter_rms(self.params)
        return self.epsilon * self.rms if self.rms > 0 else self.epsilon

    def perturbation(self) -> Perturbation | OutputPerturbation:
        return OutputPerturbation(self.engine.model, self.params) if self.via_outputs else Perturbation(self.params)

    # ------------------------------------------------------------------ finite differences
    def differences(
        self,
        sets: Sequence[tuple[Any, Sequence[int]]],
        directions: Sequence[Direction],
        batch_size: int,
        h: float | None = None,
        desc: str = "zeroth differences",
        scheme: str = "central",
    ) -> list[torch.Tensor]:
        """``d`` for every ``(dataset, indices)`` in ``sets``: one float64 tensor ``[len(indices), K]`` each.

        ``scheme="central"``: (f(θ+hξ) − f(θ−hξ)) / 2h, 2K passes, error O(h²).
        ``scheme="forward"``: (f(θ+hξ) − f(θ)) / h with f(θ) computed once, K + 1 passes, error O(h).
        NaN where a sample has no supervised token. Parameters are restored before returning.
        """
        if scheme not in ("central", "forward"):
            raise ValueError(f"scheme must be 'central' or 'forward', got {scheme!r}")
        h = self.step() if h is None else h
        K = len(directions)
        out = [torch.full((len(ids), K), float("nan"), dtype=torch.float64) for _, ids in sets]
        engine = self.engine
        progress = None
        passes = 2 * K if scheme == "central" else K + 1
        if engine.show_progress:  # one bar over the perturbed passes instead of one per engine call
            from tqdm.auto import tqdm

            progress = tqdm(total=passes, desc=f"[DataFlex] {desc}", unit="pass", leave=False)
        shown, engine.show_progress = engine.show_progress, False

        def one_pass() -> list[torch.Tensor]:
            per_set = []
            for dataset, ids in sets:
                per_set.append(engine.losses(dataset, ids, batch_size, desc=desc))
                self.cost.rank_forwards += engine.forward_passes
                self.cost.sample_forwards += len(ids)
            if progress is not None:
                progress.update(1)
            return per_set

        try:
            base = one_pass() if scheme == "forward" else None  # f(θ), shared by every direction
            with self.perturbation() as pert:
                for k, direction in enumerate(directions):
                    pert.apply(direction, h)
                    plus = one_pass()
                    if base is None:  # central: f(θ − hξ) over a span of 2h
                        pert.apply(direction, -h)
                        lower, span = one_pass(), 2.0 * h
                    else:
                        lower, span = base, h
                    for s in range(len(sets)):
                        out[s][:, k] = (plus[s] - lower[s]) / span
        finally:
            engine.show_progress = shown
            if progress is not None:
                progress.close()
        return out

    # ------------------------------------------------------------------ eval gradient
    def eval_gradient(self, dataset: Any, indices: Sequence[int], batch_size: int,
                      desc: str = "zeroth eval gradient") -> tuple[list[torch.Tensor], int]:
        """ḡ = ∇ of the mean per-sample loss over ``indices`` (float32, one tensor per trainable parameter).

        Batches go through the engine's sharded loop; each rank sums the gradients of its own
        batches (the padding batches that keep the counts equal are run and discarded) and the
        sums are added over ranks. Returns ``(ḡ, number of samples with a supervised token)``.
        ``.grad`` of the parameters is not touched.
        """
        engine, model = self.engine, self.engine.model
        tensors = [p for _, p in self.params]
        acc = [torch.zeros(full_shape(p), dtype=torch.float32, device=p.device) for p in tensors]
        position = {name: i for i, (name, _) in enumerate(self.params)}
        linears = None
        if self.via_outputs:  # parameters untouched (ZeRO-3): gradients of the layers' outputs instead
            linears = output_linears(model)

        def grad_of(batch: Batch) -> list[bool]:
            mine = not batch.padding  # padding batches keep ranks in step; their gradient is dropped
            if linears is not None:
                per_sample = per_sample_gradients(model, batch.inputs, batch.labels, linears)
                if mine:
                    for name, g in per_sample:
                        a = acc[position[name]]
                        a.add_(g.sum(dim=0).view(a.shape).to(a.device))
                return (per_sample.counts > 0).cpu().tolist()
            with torch.enable_grad():
                sums, counts = supervised_loss_sums(model, batch.inputs, batch.labels)
                total = (sums / counts.clamp(min=1)).sum()
                if total.requires_grad:
                    grads = torch.autograd.grad(total, tensors, allow_unused=True)
                else:  # no supervised token in the batch
                    grads = [None] * len(tensors)
            if mine:
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.float())
            return (counts > 0).cpu().tolist()

        with eval_mode(model):
            flags = engine.map(dataset, indices, batch_size, grad_of, desc, backward=True)
        self.cost.rank_backwards += engine.forward_passes
        self.cost.rank_forwards += engine.forward_passes
        self.cost.sample_forwards += len(indices)
        valid = sum(bool(f) for f in flags)
        if engine.world_size > 1:
            flat = torch.cat([a.reshape(-1) for a in acc])
            total = engine.agreement.all_reduce("zeroth eval gradient: sum over ranks", flat).to(flat.device, flat.dtype)
            acc = [t.view_as(a) for t, a in zip(torch.split(total, [a.numel() for a in acc]), acc)]
        return [a / max(valid, 1) for a in acc], valid


def tensor_direction(tensors: Sequence[torch.Tensor], scale: float = 1.0) -> Direction:
    """A fixed direction given as one float32 tensor per trainable parameter, times ``scale``."""

    def make(i: int, _: str, param: torch.Tensor) -> torch.Tensor:
        return (tensors[i].float() * scale).to(param.device)

    return make


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))
