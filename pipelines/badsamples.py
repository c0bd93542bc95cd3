"""One policy for unreadable samples, used by every loader loop and by ``prepare`` / ``inspect``.

``replace`` (the default): a sample that cannot be read or decoded is replaced by the next readable
one (``i + 1, i + 2, ...`` modulo the dataset), so batches keep their size; ``skip``: it is left out
(the batch is one smaller).  Either way each bad file is logged once (one line, however many epochs
meet it), counted, and listed in :meth:`BadSamples.summary`.  More than ``max_tries`` consecutive bad
samples is a :class:`~pipelines.errors.DataError` (the dataset is likely corrupt).
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

from pipelines.errors import ConfigError, DataError

log = logging.getLogger("pipelines")

#: How many following samples are tried in turn when a file cannot be decoded.
MAX_REPLACEMENTS = 16
POLICIES = ("replace", "skip")

T = TypeVar("T")


class BadSamples:
    """Bad-sample policy and bookkeeping of one loader (or one ``prepare`` run).

    ``reasons`` maps each bad file's name to its first reason (the report); ``count`` is how many
    times a bad sample was met.  With ``remember``, ``known`` holds the sample indices found bad and
    they are never tried again (DALI, where a bad file costs a pipeline rebuild); otherwise a file is
    retried when next met (a transient read error may pass).
    """

    def __init__(self, policy: str = "replace", max_tries: int = MAX_REPLACEMENTS,
                 logger: logging.Logger | None = None, remember: bool = False) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"bad_samples: must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.max_tries = int(max_tries)
        self.log = logger or log
        self.remember = bool(remember)
        self.known: set[int] = set()
        self.reasons: dict[str, str] = {}
        self.count = 0

    def mark(self, name: str, reason: str, index: int | None = None) -> None:
        """Record one bad sample: logged the first time its file is met, counted every time."""
        self.count += 1
        if index is not None and self.remember:
            self.known.add(int(index))
        if name not in self.reasons:
            self.reasons[name] = reason
            self.log.warning("skipping unreadable image %s (%s)", name, reason)

    def resolve(self, i: int, n: int, load: Callable[[int], T], name: Callable[[int], str],
                failed: str | None = None) -> tuple[int, T | None, list[str]]:
        """Load sample ``i`` of ``n`` under the policy: ``(index used, value or None, bad names met)``.

        ``load(j)`` raises for a bad sample.  ``replace`` tries ``i, i + 1, ...`` and returns the
        first that loads; ``skip`` returns ``(i, None, [name])`` when ``i`` itself is bad.
        ``failed``: ``i`` was already tried (e.g. in a batched decode) and failed for this reason.
        """
        bad: list[str] = []
        tries = min(self.max_tries, n) if self.policy == "replace" else 1
        first = 0
        if failed is not None:
            self.mark(name(int(i)), failed, int(i))
            bad.append(name(int(i)))
            first = 1
        for k in range(first, tries):
            j = (int(i) + k) % n
            if j not in self.known:
                try:
                    return j, load(j), bad
                except Exception as e:  # noqa: BLE001 - any read / decode failure means a bad sample
                    self.mark(name(j), _reason(e), j)
            else:
                self.count += 1
            bad.append(name(j))
        if self.policy == "skip":
            return int(i), None, bad
        raise DataError(f"{tries} consecutive unreadable images starting at {bad[0]}; "
                        "is the dataset corrupt?")

    def summary(self) -> str:
        """One line: how many bad files, met how often, and the first few names."""
        if not self.reasons:
            return "no unreadable images"
        names = sorted(self.reasons)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        verb = "replaced" if self.policy == "replace" else "skipped"
        return (f"{len(names)} unreadable image(s) {verb} ({self.count} time(s)): "
                f"{', '.join(names[:5])}{more}")


def _reason(e: BaseException) -> str:
    from pipelines.formats.probe import BadImage

    if isinstance(e, BadImage):
        return str(e)
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):  # its message names a BytesIO object, not the file
        return "not a readable image (unrecognised format)"
    return f"{type(e).__name__}: {e}"
