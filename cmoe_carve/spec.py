"""The expert layout `S{shared}A{active}E{total}` and how it maps onto an FFN's neurons."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import SpecError

_SPEC_RE = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class ExpertSpec:
    """`num_shared` always-on experts, `top_k` of the routed ones per token, `num_experts` in all."""

    num_shared: int
    top_k: int
    num_experts: int

    @property
    def num_routed(self) -> int:
        return self.num_experts - self.num_shared

    @property
    def active_fraction(self) -> float:
        return (self.num_shared + self.top_k) / self.num_experts

    def expert_size(self, intermediate_size: int) -> int:
        """Neurons per expert; the FFN is padded with zero neurons up to a multiple of the count."""
        return math.ceil(intermediate_size / self.num_experts)

    def __str__(self) -> str:
        return f"S{self.num_shared}A{self.top_k}E{self.num_experts}"


def parse_spec(text: str) -> ExpertSpec:
    """Parse and validate `S2A2E16`-style layouts."""
    match = _SPEC_RE.match(text.strip())
    if not match:
        raise SpecError(
            f"invalid --spec {text!r}: expected S<shared>A<active>E<total>, for example S2A2E16"
        )
    shared, active, total = (int(g) for g in match.groups())
    if total < 2:
        raise SpecError(f"invalid --spec {text!r}: E (total experts) must be at least 2")
    if shared >= total:
        raise SpecError(
            f"invalid --spec {text!r}: S={shared} shared experts leave no routed expert out of "
            f"E={total}; use S < E"
        )
    if active < 1:
        raise SpecError(f"invalid --spec {text!r}: A (active routed experts) must be at least 1")
    if active > total - shared:
        raise SpecError(
            f"invalid --spec {text!r}: A={active} active experts exceed the {total - shared} "
            f"routed ones (E - S); use A <= {total - shared}"
        )
    return ExpertSpec(num_shared=shared, top_k=active, num_experts=total)


def check_spec_fits(spec: ExpertSpec, intermediate_size: int) -> None:
    """Every expert must hold at least one real neuron."""
    if spec.num_experts > intermediate_size:
        raise SpecError(
            f"--spec {spec} asks for {spec.num_experts} experts but the FFN has only "
            f"{intermediate_size} neurons; use E <= {intermediate_size}"
        )
