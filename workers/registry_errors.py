"""How registries word their failures, sorted once into imagepub's error classes.

The Docker daemon (in its push and pull streams) and skopeo (in its last log line) both relay
the distribution API's error codes and Go's network errors in the same words
(``manifest unknown``, ``unauthorized: authentication required``, ``toomanyrequests``,
``connection refused``…), so one table classifies both: whether a failure is permanent or worth
another attempt follows from the class it lands in (service/errors.py).
"""

from __future__ import annotations

import re

from service import errors

# Most specific first: the first match decides the error class.
REGISTRY_ERRORS: list[tuple[re.Pattern, type[errors.ImagepubError]]] = [
    (re.compile(r"authorization token has expired|token has expired", re.I), errors.TokenRejected),
    (re.compile(r"tag invalid: .*cannot be overwritten because the repository is immutable", re.I), errors.TagImmutable),
    (re.compile(r"unauthorized|authentication required|no basic auth credentials|incorrect username or password", re.I), errors.AuthFailed),
    (re.compile(r"name unknown|repository .* does not exist|repository name not known", re.I), errors.RepositoryNotFound),
    (re.compile(r"manifest unknown|manifest for .* not found|not found: manifest", re.I), errors.ManifestNotFound),
    (re.compile(r"denied", re.I), errors.AccessDenied),
    (re.compile(r"toomanyrequests|too many requests|rate exceeded|throttl", re.I), errors.Throttled),
    (
        re.compile(
            r"connection refused|connection reset|i/o timeout|timeout|timed out|no such host|"
            r"unexpected EOF|\bEOF\b|broken pipe|server misbehaving|status: 50[0234]|"
            r"503 Service Unavailable|502 Bad Gateway|temporarily unavailable|network is unreachable",
            re.I,
        ),
        errors.RegistryUnavailable,
    ),
]


def classify(message: str, default: type[errors.ImagepubError],
             first: list[tuple[re.Pattern, type[errors.ImagepubError]]] = ()) -> errors.ImagepubError:
    """The error ``message`` describes: the class of the first pattern it matches (``first``,
    a caller's own, before the shared ones), else ``default``."""
    for pattern, cls in [*first, *REGISTRY_ERRORS]:
        if pattern.search(message):
            return cls(message)
    return default(message)
