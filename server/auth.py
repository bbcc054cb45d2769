"""API keys: checked in constant time against every configured key, on every route."""

from __future__ import annotations

import hmac
import logging

log = logging.getLogger(__name__)


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, presented: str | None) -> bool:
        """True when no keys are configured, or `presented` equals one of them.

        Every key is compared, whatever matched, so timing reveals neither a key nor which one.
        """
        if not self._keys:
            return True
        candidate = (presented or "").encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched


def warn_if_exposed(host: str, loopback: bool, keys: ApiKeys) -> None:
    if not loopback and not keys.enabled:
        banner = "!" * 78
        log.warning(
            "\n%s\n!! Listening on %s with NO API KEY: anyone who can reach this port can run jobs\n"
            "!! and read every result. Set --api-key / SAM3_SERVE_API_KEY, or bind 127.0.0.1.\n%s",
            banner,
            host,
            banner,
        )
