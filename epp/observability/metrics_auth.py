"""Bearer-token protection of the metrics port (``--metrics-endpoint-auth``).

As in the upstream picker, a request must carry ``Authorization: Bearer <token>``; the
token is checked with a Kubernetes ``TokenReview`` and the user it names must be allowed
the request by a ``SubjectAccessReview`` on the non-resource URL (the request path, verb
the lower-cased HTTP method: ``get /metrics``, the permission Prometheus' ClusterRole
grants). No or an unknown token is 401, a known user without the permission 403.
Verdicts are cached briefly per token, path and verb, so a scraper does not cost two API
calls per scrape; an API-server failure is 500 and is not cached.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web
from kubernetes_asyncio.client import (
    ApiClient,
    AuthenticationV1Api,
    AuthorizationV1Api,
    V1NonResourceAttributes,
    V1SubjectAccessReview,
    V1SubjectAccessReviewSpec,
    V1TokenReview,
    V1TokenReviewSpec,
)

from epp.supervise import LogLimiter

log = logging.getLogger(__name__)

# A verdict is reused this long. Prometheus scrapes every 15-30 s with the same token, so
# one minute costs the API server one review pair per minute per scraper; a revoked
# token or a removed RoleBinding takes effect within that minute.
VERDICT_TTL_S = 60.0
# Distinct (token, path, verb) verdicts kept. Honest scrapers are a handful; the bound
# stops a client that sends endless random tokens from growing memory (each entry is
# ~200 bytes, so 1,024 entries is ~200 KB). The oldest entry goes first.
MAX_CACHED_VERDICTS = 1024

ClientFactory = Callable[[], Awaitable[ApiClient]]


class MetricsAuthenticator:
    """Decides whether a request to the metrics port may be served."""

    def __init__(self, client_factory: ClientFactory, *, ttl_s: float = VERDICT_TTL_S,
                 max_entries: int = MAX_CACHED_VERDICTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._factory = client_factory
        self._client: ApiClient | None = None
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._verdicts: OrderedDict[tuple[bytes, str, str], tuple[float, int]] = OrderedDict()
        self._logs = LogLimiter(log)
        self.reviews = 0  # TokenReviews sent (for tests and debugging)

    async def close(self) -> None:
        """Close the API client, if one was opened."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        """aiohttp middleware: refuse the request unless :meth:`verdict` is 200."""
        status = await self.verdict(request.headers.get("Authorization"), request.path,
                                    request.method.lower())
        if status != 200:
            text = {401: "Unauthorized", 403: "Forbidden"}.get(status, "Internal Server Error")
            return web.Response(status=status, text=text + "\n")
        return await handler(request)

    async def verdict(self, authorization: str | None, path: str, verb: str) -> int:
        """200 (allowed), 401 (no or unknown token), 403 (not allowed) or 500."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 401
        key = (hashlib.sha256(token.encode()).digest(), path, verb)
        now = self._clock()
        cached = self._verdicts.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            status = await self._review(token, path, verb)
        except Exception as exc:  # the API server failed us, not the client
            self._logs.warning("review", "metrics auth: review failed: %s: %s",
                               type(exc).__name__, exc)
            return 500
        self._verdicts[key] = (now + self._ttl_s, status)
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > self._max:
            self._verdicts.popitem(last=False)
        return status

    async def _review(self, token: str, path: str, verb: str) -> int:
        if self._client is None:
            self._client = await self._factory()
        self.reviews += 1
        review = await AuthenticationV1Api(self._client).create_token_review(
            V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                          spec=V1TokenReviewSpec(token=token)))
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            return 401
        user = status.user
        access = await AuthorizationV1Api(self._client).create_subject_access_review(
            V1SubjectAccessReview(
                api_version="authorization.k8s.io/v1", kind="SubjectAccessReview",
                spec=V1SubjectAccessReviewSpec(
                    user=user.username, uid=user.uid, groups=user.groups, extra=user.extra,
                    non_resource_attributes=V1NonResourceAttributes(path=path, verb=verb))))
        allowed = access.status is not None and bool(access.status.allowed)
        if not allowed:
            log.info("metrics auth: %s may not %s %s", user.username, verb, path)
        return 200 if allowed else 403
