"""What may happen to a message, with no SMTP here: the routing decision (pure), the quota
(reserve, commit, refund and their Lua scripts in ``lua/``), late settlements, calendar
months, subscriptions (plan changes), usage reports with each month's own terms (history)
and the forecast, and which recipients of a resubmitted message were already sent
(``dedup``).

May import identity, observe, config, store, message and errors; never smtp or delivery.
"""
