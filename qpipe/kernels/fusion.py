"""Sibling projections of one input run as one 4-bit matmul: q/k/v and gate/up.

At batch 1 a decode step is a few hundred small matmuls, and each launch has a fixed cost (a
few microseconds on the GPU, tens of them in eager Python) that the narrow ones (k and v of a
GQA model: 1024 x 4096) never amortize. ``fuse_projections(model)`` concatenates the
QuantLinears of each sibling group into one (``qkv_proj``, ``gate_up_proj``, the names vLLM
uses) and puts in each original name a ``ProjectionSlice`` that returns its columns of the
fused output. The model's own forward code runs unchanged, so this works for every
architecture that names its projections like Llama (Qwen2/3, Mistral, InternVL's LM, ...).

The first sibling called on an input computes all of them; the others find that input (the
same tensor object) and take their slice; the last one drops the result, so nothing outlives
the forward. A sibling called on another input (cross-attention) recomputes: always correct,
fused or not. Under torch.compile the hand-off is plain module-attribute state, which Dynamo
traces without a graph break.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from qpipe.kernels.quant_linear import QuantLinear

# (the fused module's name, the sibling names in output order)
SIBLINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("gate_up_proj", ("gate_proj", "up_proj")),
)


class FusedProjections(torch.nn.Module):
    """One QuantLinear holding several projections' rows; hands each sibling its part."""

    def __init__(self, fused: QuantLinear, names: tuple[str, ...], sizes: tuple[int, ...]):
        super().__init__()
        self.fused = fused
        self.names = names
        self.sizes = sizes
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] | None = None
        self._left = 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x:
            self._parts = self.fused(x).split(self.sizes, dim=-1)
            self._input = x
            self._left = len(self.sizes)
        out = self._parts[index]
        self._left -= 1
        if self._left == 0:  # every sibling has its part: hold nothing between forwards
            self._input = None
            self._parts = None
        return out

    def extra_repr(self) -> str:
        return f"parts={dict(zip(self.names, self.sizes, strict=True))}"


class ProjectionSlice(torch.nn.Module):
    """Stands where one of the fused projections stood; its weights live in the fused module
    (held outside this module's registry, so state_dict and .to() see them once)."""

    def __init__(self, owner: FusedProjections, index: int) -> None:
        super().__init__()
        self.__dict__["_owner"] = owner
        self.index = index
        self.in_features = owner.fused.in_features
        self.out_features = owner.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner.part(x, self.index)

    def extra_repr(self) -> str:
        return (
            f"{self._owner.names[self.index]} of the fused projections, {self.out_features} outputs"
        )


def _fusable(mods: list[torch.nn.Module]) -> bool:
    first = mods[0]
    if not all(isinstance(m, QuantLinear) for m in mods):
        return False
    same = all(
        (m.in_features, m.k_padded, m.group_size, m.symmetric, m.dtype, m.kernel, m.bias is None)
        == (
            first.in_features,
            first.k_padded,
            first.group_size,
            first.symmetric,
            first.dtype,
            first.kernel,
            first.bias is None,
        )
        and m.qweight.device == first.qweight.device
        for m in mods
    )
    # act-order checkpoints: one input permutation for all (GPTQ gives siblings the same one,
    # their Hessian being the same; anything else stays unfused)
    perms = [m.perm for m in mods]
    if any(p is not None for p in perms):
        same = same and all(p is not None and torch.equal(p, perms[0]) for p in perms)
    return same


def concat(mods: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose outputs are ``mods``' outputs side by side (exact: the rows,
    scales and zero points are copied, nothing is re-quantized)."""
    first = mods[0]
    cfg = first.config() | {"out_features": sum(m.out_features for m in mods)}
    # Built on meta and handed the concatenated tensors: the group's bytes exist twice only
    # until the siblings are dropped, never three times.
    fused = QuantLinear.from_config(cfg, kernel=first.kernel, device="meta")
    with torch.no_grad():
        forms = {m.form for m in mods}
        if len(forms) == 1 and forms != {"rows"}:  # whole 16-row tiles (tiled or fragment
            # order): they concatenate along N as they are
            fused.qweight = torch.cat([m.qweight for m in mods], dim=0)
        else:
            fused.qweight = fused.held_form(torch.cat([m.qweight_rows() for m in mods], dim=0))
        fused.scales = torch.cat([m.scales for m in mods], dim=1)
        if first.zeros is not None:
            fused.zeros = torch.cat([m.zeros for m in mods], dim=1)
        if first.perm is not None:
            fused.perm = first.perm.clone()
        if first.bias is not None:
            fused.bias = torch.nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
    return fused


def iter_fuse(model: torch.nn.Module) -> Iterator[str]:
    """Fuse the sibling groups one at a time, yielding each fused module's name once its
    siblings are gone: at any moment at most one group's bytes exist twice. Walking parents by
    name keeps no reference to a replaced sibling (a list of ``named_modules()`` would keep
    every original alive to the end: the whole model's q/k/v and gate/up twice at the peak,
    2 GB on an 8B model)."""
    parents = [name for name, module in model.named_modules() if _has_siblings(module)]
    for parent_name in parents:
        parent = model.get_submodule(parent_name) if parent_name else model
        for fused_name, names in SIBLINGS:
            mods = [getattr(parent, n, None) for n in names]
            if any(m is None for m in mods) or hasattr(parent, fused_name) or not _fusable(mods):
                continue
            owner = FusedProjections(concat(mods), names, tuple(m.out_features for m in mods))
            del mods
            setattr(parent, fused_name, owner)
            for index, name in enumerate(names):
                setattr(parent, name, ProjectionSlice(owner, index))
            yield f"{parent_name}.{fused_name}" if parent_name else fused_name


def _has_siblings(module: torch.nn.Module) -> bool:
    return any(all(hasattr(module, n) for n in names) for _, names in SIBLINGS)


def fuse_projections(model: torch.nn.Module) -> list[str]:
    """Fuse every sibling group of QuantLinears in ``model`` in place; the fused modules'
    names. Groups with a non-quantized member (an excluded layer) or differing settings are
    left as they are."""
    return list(iter_fuse(model))
