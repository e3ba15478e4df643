"""Errors a person can act on: one or two lines naming the object, the reason and what to check.

Raise `UsageError` (exit status 2) when the command line or a config is wrong, `JobError` (exit status 1)
when something fails at run time; both carry a `message` (the object and the reason) and an optional `hint`
(what to check). `jobs/cli.py` prints them without a traceback (`--debug` or SIMPLEPOSE_DEBUG=1 shows it)
and maps common raw exceptions the same way (`explain`). Code that touches storage on behalf of a named
argument wraps it in `about("INPUT", uri, options)`: store errors (missing objects, permissions, no
credentials, an unreachable endpoint) then become a JobError naming the URI and the settings to check.

Nothing here imports botocore or Ray: their exceptions are recognised by class name.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit


class SimplePoseError(Exception):
    """Base class: `message` names the object and the reason, `hint` says what to check (or None)."""

    exit_status = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint

    def lines(self) -> list[str]:
        return [self.message] + ([self.hint] if self.hint else [])


class UsageError(SimplePoseError, ValueError):
    """The command line or a config is wrong (exit status 2). A ValueError, as configs raised before."""

    exit_status = 2


class JobError(SimplePoseError, RuntimeError):
    """A failure at run time: storage, a model file, a run folder (exit status 1)."""

    exit_status = 1


class NoInputError(JobError, ValueError):
    """INPUT exists nowhere or matched no objects (a ValueError, as `RunFolder.freeze_inputs` raised before)."""


DEBUG_HINT = "run again with --debug (or SIMPLEPOSE_DEBUG=1) to see the traceback"

_CREDENTIALS = ("credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role, or "
                "--storage-option key=... --storage-option secret=...")


def _names(error: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(error).__mro__}


def _endpoint(storage_options: Mapping | None) -> str:
    options = dict(storage_options or {})
    endpoint = options.get("endpoint_url") or dict(options.get("client_kwargs") or {}).get("endpoint_url") \
        or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return "the AWS default endpoint (AWS_ENDPOINT_URL is not set)"
    parts = urlsplit(str(endpoint))
    host = parts.netloc.rsplit("@", 1)[-1]  # never show credentials embedded in a URL
    return f"endpoint {parts._replace(netloc=host).geturl()}"


def _where(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs") and parts.netloc:
        return f" (bucket {parts.netloc!r})"
    return ""


def storage_error(error: BaseException, uri: str, role: str = "object",
                  storage_options: Mapping | None = None) -> JobError | None:
    """A JobError naming `role` (INPUT, OUTPUT, MODEL...) and `uri` for a store error; None if `error` is not one."""
    names = _names(error)
    remote = "://" in uri and not uri.startswith(("file://", "memory://"))
    settings = (f"check AWS_ENDPOINT_URL / --storage-option endpoint_url=... (now {_endpoint(storage_options)}) "
                f"and the {_CREDENTIALS}") if remote else "check the path and its permissions"
    subject = f"{role} {uri!r}{_where(uri)}" if uri else role  # no URI: what the store said names it
    if not uri and isinstance(error, OSError) and not names & {"NoCredentialsError", "EndpointConnectionError"}:
        return JobError(f"{role}: {type(error).__name__}: {str(error)[:200]}",
                        "check the URI, AWS_ENDPOINT_URL / --storage-option and the credentials")
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return JobError(f"{subject}: no storage credentials were found", f"set the {_CREDENTIALS}")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError"}:
        said = str((getattr(error, "kwargs", None) or {}).get("endpoint_url") or "").split("?", 1)[0]
        return JobError(f"{subject}: cannot connect to {_endpoint(storage_options) if uri or not said else said}",
                        "check AWS_ENDPOINT_URL or --storage-option endpoint_url=..., and that the store is up")
    if "ClientError" in names:
        info = getattr(error, "response", {}).get("Error", {})
        return JobError(f"{subject}: the store refused the request ({info.get('Code', '?')}: "
                        f"{info.get('Message', str(error))[:160]})", settings)
    if isinstance(error, FileNotFoundError):
        return JobError(f"{subject} does not exist", f"check the URI and the {_endpoint(storage_options)} "
                        f"(AWS_ENDPOINT_URL or --storage-option endpoint_url=...)" if remote else "check the path")
    if isinstance(error, PermissionError):
        return JobError(f"{subject}: access denied ({str(error)[:160]})", settings)
    if isinstance(error, NotADirectoryError):
        return JobError(f"{subject}: a part of the path is a file, not a folder", "choose a folder path")
    if isinstance(error, IsADirectoryError):
        return JobError(f"{subject} is a folder where a file was expected", "name a file")
    if isinstance(error, (OSError, TimeoutError)) or "BotoCoreError" in names:
        return JobError(f"{subject}: {type(error).__name__}: {str(error)[:200]}", settings)
    return None


def explain(error: BaseException) -> SimplePoseError:
    """Any exception as a SimplePoseError: ours as they are, known raw ones with their object and reason,
    anything else as a one-line JobError pointing at --debug."""
    if isinstance(error, SimplePoseError):
        return error
    names = _names(error)
    if "RayTaskError" in "".join(names) and isinstance(getattr(error, "cause", None), BaseException):
        return explain(error.cause)
    if "CheckpointError" in names:
        return JobError(str(error), "check the model URI: a simplepose checkpoint, or the authors' one "
                                    "(simplepose convert-checkpoint converts it)")
    if "MlflowException" in names:
        return JobError(f"MLflow: {str(error).splitlines()[0][:300]}",
                        "check MLFLOW_TRACKING_URI / --tracking-uri and the model name and alias")
    if isinstance(error, (OSError, TimeoutError)) or "BotoCoreError" in names or "ClientError" in names:
        uri = getattr(error, "filename", None)
        explained = storage_error(error, str(uri), "path" if "://" not in str(uri) else "object") if uri else \
            storage_error(error, "", "storage")
        if explained is not None:
            return explained
    if isinstance(error, ValueError):  # configs and arguments are validated with ValueError
        text = str(error).strip() or type(error).__name__
        return UsageError(text.splitlines()[0], "check the value named above (see --help)")
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return JobError(f"{type(error).__name__}: {first}" if first else type(error).__name__, DEBUG_HINT)


def checkpoint_message(error: BaseException, role: str, uri: str) -> str:
    """A CheckpointError's text with the checkpoint named as `role` `uri` (not 'file object BytesIO')."""
    match = re.match(r"checkpoint (file object )?'[^']*'(:?) ?", str(error))
    if match is None:
        return f"{role} {uri!r}: {error}"
    return f"{role} {uri!r}{match.group(2)} {str(error)[match.end():]}"


@contextlib.contextmanager
def about(role: str, uri: str, storage_options: Mapping | None = None) -> Iterator[None]:
    """Turn store errors and unusable checkpoints inside the block into a JobError naming `role` and `uri`;
    other exceptions pass unchanged."""
    try:
        yield
    except SimplePoseError:
        raise
    except Exception as error:  # noqa: BLE001 - only recognised errors are replaced, the rest re-raised
        if "CheckpointError" in _names(error):
            raise JobError(checkpoint_message(error, role, uri),
                           "check the URI: a simplepose checkpoint, or the authors' one converted by "
                           "simplepose convert-checkpoint") from error
        explained = storage_error(error, uri, role, storage_options)
        if explained is None:
            raise
        raise explained from error


__all__ = ["SimplePoseError", "UsageError", "JobError", "NoInputError", "storage_error", "explain", "about",
           "DEBUG_HINT"]
