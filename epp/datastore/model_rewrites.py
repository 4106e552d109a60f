"""InferenceModelRewrite rules: which model a request for model X is sent as.

Written by discovery (from ``InferenceModelRewrite`` objects of the pool), read by the
director before tokenization, so the prompt is tokenized, matched and served under the
model the pod actually serves.

Precedence follows the API's rules: a rule that names the request's model exactly beats a
generic rule (one with no matches); between rules of the same kind the oldest object wins
(creation time, then name); within one object the first rule in list order wins.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    """One weighted destination model (``weight`` None: unweighted)."""

    model: str
    weight: int | None = None


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """Requests for any of ``models`` (every request when empty) go to one of ``targets``."""

    models: frozenset[str]
    targets: tuple[RewriteTarget, ...]


@dataclass(frozen=True, slots=True)
class ModelRewrite:
    """One InferenceModelRewrite object: its rules in order, and what orders it among
    others (``created`` is the RFC 3339 creation timestamp, which sorts as text)."""

    name: str
    created: str
    rules: tuple[RewriteRule, ...]


class ModelRewrites:
    """The rewrite rules in force; replaced as a whole on every change."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._exact: dict[str, tuple[RewriteRule, str]] = {}
        self._generic: tuple[RewriteRule, str] | None = None

    def replace(self, rewrites: Iterable[ModelRewrite]) -> None:
        """Install a new set of rewrite objects (all of them, not a delta)."""
        exact: dict[str, tuple[RewriteRule, str]] = {}
        generic: tuple[RewriteRule, str] | None = None
        for rewrite in sorted(rewrites, key=lambda r: (r.created, r.name)):
            for rule in rewrite.rules:
                if not rule.targets:
                    continue  # no action: nothing to rewrite to
                if not rule.models:
                    generic = generic or (rule, rewrite.name)
                for model in rule.models:
                    exact.setdefault(model, (rule, rewrite.name))
        self._exact, self._generic = exact, generic

    def __len__(self) -> int:
        return len(self._exact) + (self._generic is not None)

    def rule_for(self, model: str) -> tuple[RewriteRule, str] | None:
        """The rule that applies to ``model`` and the name of its object, if any."""
        return self._exact.get(model) or self._generic

    def target(self, model: str) -> str | None:
        """The model a request for ``model`` is sent as (None: no rule applies). Weighted
        targets are drawn in proportion to their weights, unweighted ones uniformly; when
        weights are mixed, unweighted targets are never drawn (as upstream)."""
        found = self.rule_for(model)
        if found is None:
            return None
        targets = found[0].targets
        weighted = [t for t in targets if t.weight]
        if not weighted:
            return self._rng.choice(targets).model
        draw = self._rng.randrange(sum(t.weight or 0 for t in weighted))
        for t in weighted:
            draw -= t.weight or 0
            if draw < 0:
                return t.model
        return weighted[-1].model  # unreachable: the draw is below the total
