"""Credentials -> ``Principal`` (STYLE §1 step 2).

A login containing ``@`` is a user credential (the user's email); any other login is an app
credential (``smartplans``, ``campaigns``, ``command``…). The slow scrypt check runs in a
worker thread so one AUTH never stalls the other connections on the event loop.
"""

from __future__ import annotations

import asyncio

from relay.accounts import AccountStore, AppPrincipal, Principal, UserPrincipal
from relay.passwords import DUMMY_HASH, verify_password


class Authenticator:
    def __init__(self, accounts: AccountStore) -> None:
        self._accounts = accounts

    async def authenticate(self, login: bytes, password: bytes) -> Principal | None:
        """The principal for valid, active credentials; None otherwise.

        Raises StoreUnavailableError when Redis cannot be asked (the caller answers 454).
        """
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        principal: Principal | None = None
        stored = DUMMY_HASH
        if "@" in name:
            found = await self._accounts.user_password_hash(name)
            if found is not None and found[0].active:
                principal, stored = UserPrincipal(found[0].email, found[0].id), found[1]
        elif name:
            app = await self._accounts.app_password_hash(name)
            if app is not None and app[0].status == "active":
                principal, stored = AppPrincipal(app[0].name), app[1]
        # Always pay for one hash, so unknown logins and wrong passwords take the same time.
        ok = await asyncio.to_thread(verify_password, password, stored)
        return principal if ok and principal is not None else None
