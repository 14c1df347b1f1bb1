"""USD prices per model, so `budget.max_cost_usd` can cap spending in money, not just tokens.

The built-in table holds APPROXIMATE LIST PRICES (USD per 1M tokens, standard tier, no caching
discounts) for a few common models as known when this file was written. Providers change prices;
a user's table from config merges over this one and always wins. An unknown model costs 0 and
`PriceTable.known()` says so, so the engine can refuse a cost cap it could not enforce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from looptree.engine.errors import ConfigError


@dataclass(frozen=True)
class Price:
    """USD per 1,000,000 tokens."""

    input_per_m: float
    output_per_m: float


# Approximate list prices (USD / 1M tokens: input, output). Not authoritative: override them.
APPROX_LIST_PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "o3": Price(2.00, 8.00),
    "o4-mini": Price(1.10, 4.40),
    "gemini-2.5-pro": Price(1.25, 10.00),
    "gemini-2.5-flash": Price(0.30, 2.50),
    "gemini-2.0-flash": Price(0.10, 0.40),
    "deepseek-chat": Price(0.27, 1.10),
    "deepseek-reasoner": Price(0.55, 2.19),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-opus-4": Price(15.00, 75.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
}


def _parse_price(model: str, value: Any) -> Price:
    """Accept `{input = 2.0, output = 8.0}` or `[2.0, 8.0]` (USD per 1M tokens)."""
    try:
        if isinstance(value, Price):
            price = value
        elif isinstance(value, Mapping):
            price = Price(float(value["input"]), float(value["output"]))
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            price = Price(float(value[0]), float(value[1]))
        else:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"price for model {model!r} must be {{input = USD/1M, output = USD/1M}} "
            f"or [input, output], got {value!r}"
        ) from None
    for amount in (price.input_per_m, price.output_per_m):
        if not math.isfinite(amount) or amount < 0:
            raise ConfigError(f"price for model {model!r} must be finite and >= 0, got {value!r}")
    return price


class PriceTable:
    """Model name → `Price`, with the user's entries merged over the built-in ones.

    Lookup tolerates provider prefixes (`openai/gpt-4.1` on OpenRouter, `models/...` on Gemini)
    and dated snapshots (`gpt-4.1-mini-2025-04-14`) by longest-prefix match.
    """

    def __init__(self, user: Mapping[str, Any] | None = None, *, builtin: bool = True) -> None:
        self._prices: dict[str, Price] = dict(APPROX_LIST_PRICES) if builtin else {}
        for model, value in (user or {}).items():
            self._prices[model.lower()] = _parse_price(model, value)

    def lookup(self, model: str) -> Price | None:
        """The price for `model`, or None when nothing matches."""
        for name in _candidates(model):
            if name in self._prices:
                return self._prices[name]
            # Longest known prefix wins: "gpt-4.1-mini-2025" → "gpt-4.1-mini", not "gpt-4.1".
            best = max(
                (k for k in self._prices if name.startswith(k + "-") or name.startswith(k + ":")),
                key=len,
                default=None,
            )
            if best is not None:
                return self._prices[best]
        return None

    def known(self, model: str) -> bool:
        return self.lookup(model) is not None

    def require(self, model: str) -> Price:
        """The price for `model`, or ConfigError: a USD cap cannot be enforced without one."""
        price = self.lookup(model)
        if price is None:
            raise ConfigError(
                f"budget.max_cost_usd is set but no price is known for model {model!r}; "
                "add it to the pricing table (USD per 1M input/output tokens)"
            )
        return price

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one call; 0.0 for an unknown model."""
        price = self.lookup(model)
        if price is None:
            return 0.0
        return (prompt_tokens * price.input_per_m + completion_tokens * price.output_per_m) / 1e6


def _candidates(model: str) -> list[str]:
    """`model` lower-cased, then without its provider prefix(es)."""
    name = model.strip().lower()
    out = [name]
    if "/" in name:
        out.append(name.rsplit("/", 1)[1])
    return out


_DEFAULT_TABLE = PriceTable()


def cost(
    model: str, prompt_tokens: int, completion_tokens: int, table: PriceTable | None = None
) -> float:
    """USD for one call by `table` (default: the built-in approximate list prices)."""
    return (table or _DEFAULT_TABLE).cost(model, prompt_tokens, completion_tokens)
