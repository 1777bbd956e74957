"""Talking to the Hub: the endpoint, the token (from HF_TOKEN or the login cache only, never
written or shown), HfApi with timeouts, one-line errors, and retries of operations that are
safe to repeat."""

import os
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from shardtune.errors import UserError

DEFAULT_ENDPOINT = "https://huggingface.co"

RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class HubError(UserError):
    """Publishing failed; the message says why in one line."""


class HubAuthError(HubError):
    """No token, or the hub rejected it (401) or refused it write access (403)."""


class HubServerError(HubError):
    """The hub kept answering 5xx / 429 after every retry."""


class HubUnreachableError(HubError):
    """No connection to the endpoint (or offline mode)."""


class HubPrivacyError(HubError):
    """The repo exists and is public while hub.private is true."""


class HubIntegrityError(HubError):
    """A file on the hub differs from the local one after the commit."""


def resolve_endpoint(hub):
    """hub.endpoint, else HF_ENDPOINT, else the public hub."""
    return (hub.get("endpoint") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def shown_endpoint(endpoint):
    """The endpoint without any user:password part, for logs and records."""
    parts = urlsplit(endpoint)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def resolve_token():
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubAuthError(
            "no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (the token is read from nowhere else)"
        )
    return token


def token_source():
    """Where a token would come from, without reading it (for dry runs)."""
    from huggingface_hub import constants

    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN"
    if Path(constants.HF_TOKEN_PATH).is_file():
        return "login cache"
    return None


def hub_api(endpoint, token):
    from huggingface_hub import HfApi

    _use_timeouts()
    return HfApi(endpoint=endpoint, token=token)


_TIMEOUTS_SET = False


def _use_timeouts():
    """huggingface_hub's client waits forever by default; a silent endpoint must fail instead."""
    global _TIMEOUTS_SET
    if _TIMEOUTS_SET:
        return
    import httpx2
    from huggingface_hub.utils import _http

    def factory():
        client = _http.default_client_factory()
        client.timeout = httpx2.Timeout(600.0, connect=30.0)
        return client

    _http.set_client_factory(factory)
    _TIMEOUTS_SET = True


def scrub(text, token):
    return text.replace(token, "***") if token else text


def classify(err, endpoint, repo_id):
    """(a HubError saying what went wrong in one line, whether retrying may help), or
    (None, False) for an error that is not about the hub."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # The client wraps some failures (e.g. an upload's) in RuntimeError: look at the causes.
    seen = err
    while seen is not None and not isinstance(seen, (HfHubHTTPError, OfflineModeIsEnabled, httpx2.TransportError)):
        seen = seen.__cause__ or seen.__context__
    err = seen if seen is not None else err
    if isinstance(err, OfflineModeIsEnabled):
        return (
            HubUnreachableError("HF_HUB_OFFLINE is set: unset it to publish (hub.dry_run: true needs no network)"),
            False,
        )
    response = getattr(err, "response", None)
    if isinstance(err, HfHubHTTPError) and response is not None:
        status = response.status_code
        reason = f"HTTP {status} {response.reason_phrase}".strip()
        if status == 401:
            return (
                HubAuthError(
                    f"the hub at {endpoint} rejected the token ({reason}): set HF_TOKEN or run `hf auth login` with a valid token"
                ),
                False,
            )
        if status == 403:
            return (
                HubAuthError(
                    f"the token may not write to {repo_id} at {endpoint} ({reason}): it needs write access to "
                    f"'{repo_id.split('/')[0]}'"
                ),
                False,
            )
        if status in RETRY_STATUS:
            return HubServerError(f"the hub at {endpoint} failed ({reason})"), True
        detail = (getattr(err, "server_message", None) or "").strip().splitlines()
        return (
            HubError(
                f"the hub at {endpoint} refused the upload to {repo_id} ({reason})"
                + (f": {detail[0]}" if detail else "")
            ),
            False,
        )
    if isinstance(err, httpx2.TransportError):
        return (
            HubUnreachableError(f"cannot reach the hub at {endpoint}: {type(err).__name__}: {err}".rstrip(": ")),
            True,
        )
    return None, False


def with_retries(action, *, hub, endpoint, repo_id, token, log=print):
    """Run `action` (which must be safe to repeat), retrying server errors and network
    failures with exponential backoff; raise a one-line HubError when it cannot succeed."""
    attempts = hub["retries"] + 1
    shown = shown_endpoint(endpoint)
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except HubError:
            raise
        except Exception as err:
            error, retry = classify(err, shown, repo_id)
            if error is None:
                raise
            message = scrub(" ".join(str(error).split()), token)  # always one line
            log(f"hub error detail: {scrub(str(err), token)}")
            if retry and attempt < attempts:
                wait = hub["retry_backoff"] * 2 ** (attempt - 1)
                log(f"{message} (attempt {attempt} of {attempts}); retrying in {wait:g} s")
                time.sleep(wait)
                continue
            if retry and attempts > 1:
                message += f", {attempts} attempts"
            raise type(error)(message) from None
