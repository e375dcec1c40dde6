"""Server configuration: one `Settings` object, from CLI flags, `DELTASERVE_*` variables, a config file or defaults.

Every `serve` setting is a field here, and only here: `cli.py` makes one flag per field and
pydantic-settings one `DELTASERVE_<FIELD>` variable per field, so flags, variables, the config file's
keys and the defaults cannot drift apart. Flags win over variables, which win over the config file
(`--config FILE` / `DELTASERVE_CONFIG`, TOML or YAML, keys = field names), which wins over the defaults.
A `DELTASERVE_*` variable that names no setting is reported by `unknown_variables` (a misspelt
`DELTASERVE_MAX_BATCH_TOKEN` was silently ignored); an unknown key in the config file is an error.

Tokens: an empty token is refused rather than read as "no authentication" (`--admin-token ''`
once let every upload through), and each token can come from a file (`--admin-token-file`,
`DELTASERVE_ADMIN_TOKEN_FILE`, the containers' `_FILE` convention) so that it never shows in `ps`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from server.backends import BACKEND_NAMES
from server.tenants import TenantsFileError, load_tenants

BackendName = Literal[("auto", *BACKEND_NAMES)]  # type: ignore[valid-type]  # one list: server.backends

MiB = 1024 * 1024
ENV_PREFIX = "DELTASERVE_"
# DELTASERVE_* variables read elsewhere than `Settings`: not misspellings.
OTHER_VARIABLES = {
    "DELTASERVE_CONFIG": "serve --config",
    "DELTASERVE_URL": "push --url",
    "DELTASERVE_TEST_THREADS": "the tests' torch threads",
    "DELTASERVE_BASE_IMAGE": "the compose files' image base (a build argument)",
    "DELTASERVE_TORCH_INDEX_URL": "the compose files' torch index (a build argument)",
}
LogLevel = Literal["critical", "error", "warning", "info", "debug"]

# The config file's values while `Settings.load` builds one (a source of pydantic-settings, below the env).
_config_values: ContextVar[dict[str, Any] | None] = ContextVar("deltaserve_config_values", default=None)


class ConfigFileError(ValueError):
    """The config file cannot be read, is not TOML/YAML, or names a setting that does not exist."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    store: str = Field("./store", description="a folder, or s3://bucket/prefix for a store shared by replicas")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, SeaweedFS, ...); default: "
                                                          "AWS_ENDPOINT_URL, else AWS itself")
    store_poll_s: float = Field(1.0, gt=0, le=60, description="how often an S3 store's manifest is checked for "
                                                                "other replicas' changes (seconds)")
    backbone: str | None = Field(None, description="folder or hub name of the backbone; default: packaged MiniLM")
    admin_token: str | None = Field(None, repr=False,
                                    description="when set, PUT and DELETE need 'Authorization: Bearer <token>'")
    admin_token_file: Path | None = Field(None, description="read the admin token from this file (not shown in ps)")
    api_key: str | None = Field(None, repr=False, description="when set, predict and the read routes need "
                                "'Authorization: Bearer <key>' (or the admin token); /health stays open")
    api_key_file: Path | None = Field(None, description="read the API key from this file")
    tenants_file: Path | None = Field(
        None, description="TOML file of tenants, their key hashes, quotas and weights: each tenant sees and uses "
                          "its own tasks only (re-read on SIGHUP and when it changes; docs/deployment.md)")
    audit_log: str | None = Field(None, description="append a JSON line for every write, delete, refused "
                                                    "credential and quota refusal to this file ('-': stdout)")
    device: str | None = Field(None, description="torch device; default: cuda when available, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="backbone precision; auto = float16 on CUDA, float32 on CPU")
    backend: BackendName = Field(
        "auto", description="engine backend; auto = triton (grouped kernels) on CUDA, cpu elsewhere")

    max_length: int = Field(128, ge=2, description="truncation for tasks whose delta names no max_length")
    max_inputs: int = Field(64, ge=1, description="most inputs in one predict request (413 beyond)")
    max_windows: int = Field(128, ge=1, description="most windows (of max_length tokens) the long texts of one "
                                                     "token-classification request may take (413 beyond)")
    max_input_chars: int = Field(100_000, ge=1, description="most characters in one text of a predict request "
                                 "(413 beyond, before any tokenising)")
    max_batch_tokens: int = Field(1024, ge=1, description="most padded tokens (longest input × rows) in one "
                                                          "engine forward")
    max_batch_requests: int = Field(64, ge=1, description="most inputs (rows) in one engine forward")
    batch_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for more requests")
    max_queue: int = Field(256, ge=1, description="requests waiting for the engine before 429")
    max_queue_rows: int = Field(2048, ge=1, description="rows (inputs, windows of long texts) waiting for the "
                                "engine before 429; a request finds room when nothing waits")
    max_queue_s: float = Field(20.0, gt=0, description="seconds of engine work (rows waiting at the measured "
                               "rate) before 429; keep it under the shutdown grace so what was admitted drains")
    max_upload_bytes: int = Field(64 * MiB, ge=1, description="largest delta upload (413 beyond)")
    max_request_bytes: int = Field(2 * MiB, ge=1, description="largest body of any other request (413 beyond)")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="largest request line and headers of a request, "
                                  "checked as they are read (431 beyond)")
    max_headers: int = Field(100, ge=1, description="most headers in one request (431 beyond)")
    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="uvicorn's HTTP/1.1 implementation; auto = httptools when installed, else h11 "
                            "(either bounded by --max-header-bytes)")
    cache_bytes: int = Field(512 * MiB, ge=0, description="device memory budget for prepared deltas")
    malloc_threshold: int = Field(
        2 * 1024 * 1024, ge=0, le=2**31 - 1,
        description="glibc mmap and trim threshold in bytes, with 2 malloc arenas, set at start: keeps RSS "
                    "flat under load (BENCHMARKS.md, soak); 0 leaves glibc's defaults")
    malloc_trim_s: float = Field(
        1.0, ge=0, description="how often free memory inside glibc's heaps is given back to the system "
                               "(malloc_trim, in a thread of its own): keeps RSS flat where fragmentation "
                               "would let it creep up; 0 never")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")

    # Several replicas on Ray Serve (server/ray_app.py, docs/cluster.md).
    ray: bool = Field(False, description="serve on Ray Serve: replicas behind Ray's HTTP proxy on --host/--port")
    replicas: int = Field(2, ge=1, description="Ray Serve replicas (the count, or the autoscaling minimum)")
    max_replicas: int | None = Field(None, ge=1, description="Ray Serve: autoscale between --replicas and this")
    target_ongoing_requests: float = Field(32, gt=0, description="Ray Serve autoscaling: requests in flight per "
                                                                 "replica it aims at")
    ray_replica_cpus: float = Field(1, ge=0, description="CPUs Ray reserves for each replica")
    ray_address: str | None = Field(None, description="Ray cluster to join; default: start a local one")

    demo: bool | None = Field(
        None, description="install the demo tasks: true = any missing ones, false = never, "
                          "unset = only into a brand-new store")
    demo_dir: Path | None = Field(None, description="where the demo deltas are; default: the ones installed "
                                                     "with deltaserve")

    # Logging and stopping (cli.py hands them to logging and uvicorn).
    log_level: LogLevel = Field("info", description="least severe log message shown")
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines, or one JSON object per line (with the request id) for log collectors")
    access_log: bool = Field(False, description="log every HTTP request (off by default: /metrics counts them, "
                                                "at less cost)")
    shutdown_grace_s: float = Field(
        30, gt=0, description="on SIGTERM, how long accepted requests may take to finish before the server exits "
                              "anyway; give the orchestrator more (compose stop_grace_period, Kubernetes "
                              "terminationGracePeriodSeconds)")

    @classmethod
    def load(cls, flags: Mapping[str, object] | None = None, config_file: Path | str | None = None) -> Settings:
        """Settings from flags (given ones only), then `DELTASERVE_*` variables, then the config file, then
        the defaults. Raises `ConfigFileError` for a bad file and pydantic's ValidationError for bad values."""
        values = read_config_file(Path(config_file)) if config_file else None
        token = _config_values.set(values)
        try:
            return cls(**dict(flags or {}))
        finally:
            _config_values.reset(token)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        values = _config_values.get()
        if values is None:
            return init_settings, env_settings
        return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=values)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value  # INFO as well as info

    @field_validator("store", mode="before")
    @classmethod
    def _store_as_text(cls, value: object) -> object:
        # A Path stays usable (tests, callers); kept as text so that "s3://bucket" keeps its two slashes.
        return str(value) if isinstance(value, Path) else value

    @model_validator(mode="after")
    def _tokens(self) -> Settings:
        self.admin_token = _token("admin_token", self.admin_token, self.admin_token_file)
        self.api_key = _token("api_key", self.api_key, self.api_key_file)
        if self.tenants_file is not None:
            if self.api_key is not None:
                raise ValueError("api_key: --api-key reads every task, which tenants must not; with "
                                 "--tenants-file give each reader a tenant key instead")
            try:
                load_tenants(self.tenants_file)  # an invalid file stops the server before it starts
            except TenantsFileError as err:
                raise ValueError(str(err)) from None
        return self


def _token(name: str, value: str | None, file: Path | None) -> str | None:
    """The token given directly or in a file; never empty (empty would silently mean "no authentication")."""
    flag = "--" + name.replace("_", "-")
    return token_from(name, value, file, flag=flag, env=ENV_PREFIX + name.upper())


def token_from(name: str, value: str | None, file: Path | str | None, *, flag: str, env: str) -> str | None:
    """A token given as `flag` (variable `env`) or in the file of `flag`-file (`env`_FILE), never both, never
    empty: an empty one would silently mean "no authentication" for a server and "no token" for a client."""
    if value is not None and file is not None:
        raise ValueError(f"{name}: give {flag} ({env}) or {flag}-file ({env}_FILE), not both")
    if file is not None:
        file = Path(file)
        try:
            value = file.read_text(encoding="utf-8").strip()  # editors and `echo` add a newline
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{name}: cannot read {flag}-file {str(file)!r}: {err}") from None
        if not value:
            raise ValueError(f"{name}: the file {str(file)!r} is empty; an empty token would turn "
                             f"authentication off")
        return value
    if value is not None and not value.strip():
        raise ValueError(f"{name}: {flag} ({env}) is empty; an empty token would turn authentication off. "
                         f"Unset it to run without one")
    return value


def add_token_flags(parser: argparse.ArgumentParser) -> None:
    """`--token` and `--token-file` of a client command; `client_token` reads them."""
    parser.add_argument("--token", help="admin token, if the server has one (env DELTASERVE_ADMIN_TOKEN)")
    parser.add_argument("--token-file", type=Path, help="read the admin token from this file, out of sight of ps "
                                                        "(env DELTASERVE_ADMIN_TOKEN_FILE)")


def client_token(token: str | None, token_file: Path | str | None,
                 environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token a client command (`push`, `train --push`) sends: `--token` or `--token-file` as given,
    else `DELTASERVE_ADMIN_TOKEN` or `DELTASERVE_ADMIN_TOKEN_FILE`; both of a pair, or an empty one, is an
    error (ValueError) rather than one silently winning."""
    if token is None and token_file is None:
        environ = os.environ if environ is None else environ
        token, token_file = environ.get("DELTASERVE_ADMIN_TOKEN"), environ.get("DELTASERVE_ADMIN_TOKEN_FILE")
        if token is not None and token_file is not None:
            raise ValueError("token: DELTASERVE_ADMIN_TOKEN and DELTASERVE_ADMIN_TOKEN_FILE are both set; unset one")
    return token_from("token", token, token_file, flag="--token", env="DELTASERVE_ADMIN_TOKEN")


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file's settings: TOML (`.toml`) or YAML (`.yaml`, `.yml`), one key per setting, named as the
    fields (`max_batch_tokens`, or with dashes as the flags: `max-batch-tokens`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"cannot read the config file {str(path)!r}: {err}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # pyyaml: transformers depends on it

            data = yaml.safe_load(text) if text.strip() else {}
        elif path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            raise ConfigFileError(f"the config file {str(path)!r} must end in .toml, .yaml or .yml")
    except ConfigFileError:
        raise
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError: the parser's own message
        raise ConfigFileError(f"the config file {str(path)!r} is not valid {path.suffix[1:].upper()}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"the config file {str(path)!r} must hold a table of settings (key = value)")
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = [key for key in values if key not in Settings.model_fields]
    if unknown:
        raise ConfigFileError(f"the config file {str(path)!r} names no such setting: "
                              + "; ".join(_with_suggestion(key, list(Settings.model_fields)) for key in unknown))
    return values


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A sentence per `DELTASERVE_*` variable that names no setting (and nothing else reads), with the nearest
    real name when there is one: the variable is ignored, which a misspelling should not be silently."""
    environ = os.environ if environ is None else environ
    known = [ENV_PREFIX + name.upper() for name in Settings.model_fields] + list(OTHER_VARIABLES)
    return [f"{_with_suggestion(name, known)}: not a deltaserve setting, ignored"
            for name in sorted(environ) if name.upper().startswith(ENV_PREFIX) and name.upper() not in known]


def _with_suggestion(name: str, known: list[str]) -> str:
    # Compared without the common prefix, which would make every DELTASERVE_* name look alike.
    def bare(text: str) -> str:
        return text.upper().removeprefix(ENV_PREFIX)

    close = difflib.get_close_matches(bare(name), [bare(k) for k in known], n=1, cutoff=0.75)
    if not close:
        return name
    suggestion = next(k for k in known if bare(k) == close[0])
    return f"{name} (did you mean {suggestion}?)"
