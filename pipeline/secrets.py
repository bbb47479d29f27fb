"""Keeping secrets out of what the product writes and logs.

Credentials reach the product in URIs (``postgresql://user:password@host/db``, ``https://token@host``),
in environment mappings (``cluster.env``: ``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``, ...)
and in the environment itself. Everything written into a run directory, a launch record, MLflow params
or a log line goes through ``redact`` first; the real values travel only by environment or by a file
readable by its owner alone (``write_private``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REDACTED = "***"
# Names of variables and keys whose values are secrets, judged by their words (split at '_', '-', '.' and
# camelCase): HF_TOKEN, MLFLOW_TRACKING_PASSWORD, awsSecretAccessKey are; TOKENIZERS_PARALLELISM is not.
_SECRET_WORDS = {"SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASS", "PASSPHRASE", "TOKEN", "TOKENS",
                 "CREDENTIAL", "CREDENTIALS", "APIKEY"}
_SECRET_PAIRS = {("PRIVATE", "KEY"), ("API", "KEY"), ("ACCESS", "KEY"), ("SESSION", "KEY"), ("SECRET", "KEY")}
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# values that are no secret whatever the name: switches and numbers (HF_HUB_DISABLE_IMPLICIT_TOKEN=1), and
# references to a variable that holds one (export HF_TOKEN=$HF_TOKEN)
_NOT_A_SECRET_VALUE = re.compile(r"(?i:true|false|yes|no|on|off|none|null|[0-9]{1,3}|\$[A-Za-z_][A-Za-z0-9_]*"
                                 r"|\$\{[A-Za-z_][A-Za-z0-9_]*\})")
# scheme://user:password@host -> scheme://user:***@host ; scheme://<token>@host -> scheme://***@host, where a
# user name alone counts as a token when it is long (ghp_..., 40 characters; user names such as mlflow or
# postgres are short)
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*)(?::(?P<pw>[^@/\s]*))?@")
_TOKEN_AS_USER = 16
# ?password=...&token=... in query strings
_QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd|token|secret|access_key|secret_key|sig|signature)=)"
                           r"(?P<value>[^&;\s]*)", re.IGNORECASE)
# NAME=value, NAME: value, "NAME": "value" (an override, a shell line, a JSON or YAML mapping written as
# text): the value goes when NAME is a secret's (is_secret_name): cluster.env={AWS_SECRET_ACCESS_KEY: abc},
# export HF_TOKEN=abc
_ASSIGNED = re.compile(r"(?P<head>\b(?P<name>[A-Za-z0-9_.-]*(?:SECRET|PASSWORD|PASSWD|PASS|TOKEN|CREDENTIAL|KEY)"
                       r"[A-Za-z0-9_.-]*)['\"]?\s*[=:]\s*)(?P<value>\"[^\"]*\"|'[^']*'|[^\s'\",;{}\[\]&]+)",
                       re.IGNORECASE)  # candidates only: assigned() asks is_secret_name for the verdict


# tokens that say what they are whatever name they are kept under (GH=ghp_..., a token pasted in a description):
# GitHub, GitLab, Hugging Face, Slack, OpenAI-style keys
_KNOWN_TOKEN = re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|glpat-[A-Za-z0-9_-]{20,}"
                          r"|hf_[A-Za-z0-9]{30,}|xox[abposr]-[A-Za-z0-9-]{10,}|sk-(?:proj-)?[A-Za-z0-9]{32,})")


# an HTTP credential in a header or a command line: "Authorization: Basic dXNlcjpwYXNz", "Bearer abc.def";
# the scheme stays, the credential goes. Outside an Authorization header a credential must hold a digit or
# a symbol, which keeps prose such as "Basic authentication" as it is.
_AUTH_HEADER = re.compile(r"(?P<head>\bAuthorization['\"]?\s*[:=]\s*['\"]?(?:(?:Bearer|Basic|Token|Digest)\s+)?)"
                          r"(?P<value>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)
_AUTH_SCHEME = re.compile(r"(?P<head>\b(?:Bearer|Basic|Token)\s+)"
                          r"(?P<value>(?=[A-Za-z]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,})", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True for names such as ``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``, ``HF_TOKEN``, ``db.password``
    (by their words: ``TOKENIZERS_PARALLELISM`` and ``BYPASS`` are not)."""
    words = [w.upper() for w in _WORD.findall(name)]
    pairs = zip(words, words[1:], strict=False)
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in pairs)


def _is_secret_value(value: str) -> bool:
    return bool(value) and not _NOT_A_SECRET_VALUE.fullmatch(value.strip("'\""))


def redact_text(text: str) -> str:
    """``text`` with the passwords and tokens in it (URIs' credentials, query tokens, Authorization headers,
    ``NAME=value`` with a secret's name) replaced by ``***``."""

    def userinfo(m: re.Match) -> str:
        if m.group("pw") is not None:
            return f"{m.group('scheme')}{m.group('user')}:{REDACTED}@"
        if len(m.group("user")) >= _TOKEN_AS_USER:  # a bare token as user name (https://ghp_xxx@github.com)
            return f"{m.group('scheme')}{REDACTED}@"
        return m.group(0)

    text = _URI_USERINFO.sub(userinfo, text)
    text = _AUTH_HEADER.sub(lambda m: m.group("head") + REDACTED, text)
    text = _AUTH_SCHEME.sub(lambda m: m.group("head") + REDACTED, text)
    text = _QUERY_SECRET.sub(lambda m: m.group("key") + REDACTED, text)
    text = _KNOWN_TOKEN.sub(REDACTED, text)

    def assigned(m: re.Match) -> str:
        value = m.group("value")
        if not is_secret_name(m.group("name")) or not _is_secret_value(value) or value.strip("'\"") == REDACTED:
            return m.group(0)
        quote = value[0] if value[0] in "'\"" else ""
        return f"{m.group('head')}{quote}{REDACTED}{quote}"

    return _ASSIGNED.sub(assigned, text)


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (nested dicts, lists, strings) safe to write or log: values under secret-looking
    keys become ``***``, and credentials inside URIs in any string are removed."""
    if key and is_secret_name(key) and value not in (None, "") and _is_secret_value(str(value)):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def write_private(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` readable and writable by its owner only (0600), atomically."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a new file of a random name, created exclusively (mkstemp: O_EXCL, mode 0600): a fixed temporary name
    # could be a file or a link that someone else put there first (the default state directories are under
    # /tmp), which would receive the secret or redirect the write
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- secrets that ranks need: kept out of files, carried by the job's environment -----------------------


class SecretUnavailableError(ValueError):
    """A value was redacted in the run directory and the environment does not hold the real one."""


def is_secret_env(name: str, value: str) -> bool:
    """Whether an environment entry (``cluster.env``) is a secret: a secret-looking name, a value holding
    credentials (a URI with a password, a token query), or a value already redacted."""
    return value == REDACTED or (is_secret_name(name) and _is_secret_value(value)) or redact_text(value) != value


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with its secret entries' values replaced by ``***`` (what a run directory stores)."""
    return {k: REDACTED if is_secret_env(k, v) else v for k, v in env.items()}


def reveal_env(env: Mapping[str, str], where: str = "cluster.env") -> dict[str, str]:
    """``env`` as stored (secrets as ``***``) with each secret taken from this process's environment,
    where the launcher put it. A missing one is a SecretUnavailableError naming it."""
    missing = [k for k, v in env.items() if v == REDACTED and k not in os.environ]
    if missing:
        raise SecretUnavailableError(
            f"{where}: {', '.join(missing)} {'is a secret' if len(missing) == 1 else 'are secrets'} kept out of the "
            f"run directory, which reach(es) the job by environment only: export {' '.join(missing)} in the shell "
            f"that launches (or resumes) the run")
    return {k: os.environ[k] if v == REDACTED else v for k, v in env.items()}


def has_credentials(uri: str) -> bool:
    """Whether a URI carries a password or a token (``scheme://user:pw@``, ``scheme://token@``, ``?token=``)."""
    return redact_text(uri) != uri


def reveal_uri(uri: str, env_var: str = "MLFLOW_TRACKING_URI") -> str:
    """The real URI behind a redacted one (``https://user:***@host``): ``$env_var`` when that variable
    holds the same URI with its credentials (the launcher exports it to the job). A URI without ``***``
    is returned as it is."""
    if REDACTED not in uri:
        return uri
    candidate = os.environ.get(env_var, "")
    if candidate and redact_text(candidate) == uri:
        return candidate
    raise SecretUnavailableError(
        f"{uri}: its credentials are kept out of files; export {env_var} with the full URI (as when the run was "
        f"launched)" + (f" (${env_var} is set to another URI: {redact_text(candidate)})" if candidate else ""))


def private_dir(path: str | os.PathLike) -> Path:
    """A state directory of a development service (its data, pid file, credentials): created 0700, or an
    existing one of this user tightened to 0700. One owned by another user is refused: whoever owns it
    could read the stored objects or plant a pid file that ``down`` would act on."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path}: owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); choose a directory "
                              f"of your own (--dir)")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
