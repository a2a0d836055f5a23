"""How a worker's asking price follows its utilisation: one pure function, also used by the
simulator.

The rule (documented in docs/ledger.md)::

    error = (utilisation - target) / max(target, 1 - target)        # in [-1, 1]
    step  = clamp(damping * error, -max_step, max_step)
    price = clamp(price * (1 + step), floor, ceiling)

A worker busier than ``target`` raises its price, an idler one lowers it, proportionally to
how far it is from the target; ``damping`` (< 1) keeps the price from oscillating when many
workers react to the same demand at once, and ``max_step`` bounds one move. The target is a
fixed point; the price never leaves [floor, ceiling]. Prices are credits per TFLOP.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from mtor_p2p.wire import RecordError


@dataclass(frozen=True)
class PriceRule:
    """Parameters of :func:`next_price`."""

    target: float = 0.7  # utilisation the price steers towards
    damping: float = 0.25  # fraction of the (normalised) error corrected per step
    max_step: float = 0.25  # largest relative change in one step
    floor: float = 0.01  # credits per TFLOP
    ceiling: float = 1000.0

    def validate(self) -> None:
        """Raise RecordError for a rule that cannot work."""
        values = asdict(self).values()
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise RecordError("price rule values must be finite numbers")
        if not 0 < self.target < 1:
            raise RecordError("price.target must be between 0 and 1")
        if not 0 < self.damping <= 1 or not 0 < self.max_step < 1:
            raise RecordError("price.damping must be in (0, 1] and price.max_step in (0, 1)")
        if not 0 < self.floor <= self.ceiling:
            raise RecordError("price.floor must be positive and at most price.ceiling")

    @classmethod
    def from_json(cls, obj: Any) -> PriceRule:
        """Parse (and validate) a rule; missing values take their defaults."""
        if not isinstance(obj, dict) or set(obj) - set(cls.__dataclass_fields__):
            raise RecordError(
                f"price must be an object with fields {list(cls.__dataclass_fields__)}"
            )
        try:
            rule = cls(**{k: float(v) for k, v in obj.items()})
        except (TypeError, ValueError) as exc:
            raise RecordError(f"bad price rule: {exc}") from exc
        rule.validate()
        return rule


def next_price(price: float, utilisation: float, rule: PriceRule) -> float:
    """The asking price after one step of ``rule`` at ``utilisation`` (0 idle .. 1 saturated)."""
    utilisation = min(1.0, max(0.0, utilisation))
    price = min(rule.ceiling, max(rule.floor, price))
    error = (utilisation - rule.target) / max(rule.target, 1 - rule.target)
    step = min(rule.max_step, max(-rule.max_step, rule.damping * error))
    return min(rule.ceiling, max(rule.floor, price * (1 + step)))
