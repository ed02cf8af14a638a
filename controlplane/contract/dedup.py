"""What a signal's receiver already answered, by (signal, scope, idempotency key).

Controllers and bees consult it before acting: a redelivered or retried signal gets the
outcome it already had, published again, and no action is repeated. The key is scoped the
way the gateway files keys: one key may be reused for another action or another target,
and that is a new action, not a repeat. Bounded, because a receiver lives for a long time;
the gateway's own idempotency records are the durable layer.
"""

from __future__ import annotations

from collections import OrderedDict

from controlplane.contract.models import Outcome, Signal

DEFAULT_CAPACITY = 1024

# (signal, scope, idempotencyKey)
DedupKey = tuple[str, str, str]


def dedup_key(sig: Signal) -> DedupKey:
    return sig.signal, sig.scope, sig.idempotency_key


class OutcomeMemory:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._outcomes: OrderedDict[DedupKey, Outcome] = OrderedDict()

    def get(self, sig: Signal) -> Outcome | None:
        return self._outcomes.get(dedup_key(sig))

    def remember(self, sig: Signal, outcome: Outcome) -> None:
        key = dedup_key(sig)
        self._outcomes[key] = outcome
        self._outcomes.move_to_end(key)
        while len(self._outcomes) > self._capacity:
            self._outcomes.popitem(last=False)
