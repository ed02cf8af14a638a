"""What a signal's receiver already answered, by idempotency key.

Controllers and bees consult it before acting: a redelivered or retried signal gets the
outcome it already had, published again, and no action is repeated. Bounded, because a
receiver lives for a long time; the gateway's own idempotency records are the durable layer.
"""

from __future__ import annotations

from collections import OrderedDict

from controlplane.contract.models import Outcome

DEFAULT_CAPACITY = 1024


class OutcomeMemory:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()

    def get(self, idempotency_key: str) -> Outcome | None:
        return self._outcomes.get(idempotency_key)

    def remember(self, idempotency_key: str, outcome: Outcome) -> None:
        self._outcomes[idempotency_key] = outcome
        self._outcomes.move_to_end(idempotency_key)
        while len(self._outcomes) > self._capacity:
            self._outcomes.popitem(last=False)
