"""Pure: whether a conversation may still spend (``WORKER_CONVERSATION_BUDGET_USD``).

Why: one conversation (a loop in a caller, an abusive user) can run up any bill one reply at a
time. The table keeps each conversation's spend (the ``cost`` of its completed replies, read
from Vapi's chat); once it reaches the budget, further requests fail with ``budget_exceeded``
and no Vapi call. The reply that crosses the budget is paid for: the check is made before a
call, on what is spent so far. ``reset_context`` starts a new Vapi chat, not a new budget.
"""

from __future__ import annotations

from worker.errors import BudgetExceededError

__all__ = ["budget_exceeded"]


def budget_exceeded(spent_usd: float, budget_usd: float) -> BudgetExceededError | None:
    """The refusal for a conversation that spent ``spent_usd``; None while it may go on.

    ``budget_usd`` 0 turns budgets off.
    """
    if budget_usd <= 0 or spent_usd < budget_usd:
        return None
    return BudgetExceededError(
        f"the conversation has spent {spent_usd:.6f} USD, its budget is {budget_usd:g} USD "
        "(WORKER_CONVERSATION_BUDGET_USD); Vapi was not called"
    )
