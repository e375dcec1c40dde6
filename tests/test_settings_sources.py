"""One settings source (issue 23 item 4): every `serve` flag has its `DELTASERVE_*` variable and config-file key,
flags win over variables over the file over defaults, `--log-level` is validated wherever it comes from, and
a `DELTASERVE_*` variable that names no setting is reported at start instead of silently ignored."""

from __future__ import annotations

import logging
import signal

import pytest
from http_helpers import free_port
from pydantic import ValidationError

from server.cli import build_parser, main, settings_from_args
from server.settings import ConfigFileError, Settings, read_config_file, unknown_variables


def parse(*flags: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *flags]))


def test_every_setting_has_a_flag_and_a_variable(monkeypatch):
    """Each field: its flag parses, and its variable alone sets it (access_log had no variable once)."""
    serve_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in serve_help, name
    monkeypatch.setenv("DELTASERVE_ACCESS_LOG", "true")
    monkeypatch.setenv("DELTASERVE_SHUTDOWN_GRACE_S", "12.5")
    monkeypatch.setenv("DELTASERVE_LOG_FORMAT", "json")
    settings = parse()
    assert settings.access_log is True and settings.shutdown_grace_s == 12.5 and settings.log_format == "json"
    assert parse("--no-access-log").access_log is False


def test_precedence_flag_then_variable_then_file_then_default(tmp_path, monkeypatch):
    config = tmp_path / "deltaserve.toml"
    config.write_text('port = 9100\nmax_batch_tokens = 2048\nmax-queue = 7\nstore = "from-file"\n'
                      'log_level = "WARNING"\n')
    monkeypatch.setenv("DELTASERVE_MAX_BATCH_TOKENS", "4096")
    settings = parse("--config", str(config), "--port", "9200")
    assert settings.port == 9200  # flag over file
    assert settings.max_batch_tokens == 4096  # variable over file
    assert settings.max_queue == 7 and settings.store == "from-file"  # file over default (dashes as in flags)
    assert settings.log_level == "warning"  # case-insensitive, kept lower-case
    assert settings.max_inputs == Settings.model_fields["max_inputs"].default
    monkeypatch.setenv("DELTASERVE_CONFIG", str(config))
    assert parse().port == 9100  # the file named by its variable
    assert Settings().port == 8000  # and only through load/--config: a plain Settings() reads no file


def test_yaml_config(tmp_path):
    config = tmp_path / "deltaserve.yaml"
    config.write_text("max_batch_requests: 16\ndemo: false\n")
    settings = Settings.load({}, config)
    assert settings.max_batch_requests == 16 and settings.demo is False


@pytest.mark.parametrize(("name", "text", "message"), [
    ("bad.toml", "max_batch_token = 5\n", "did you mean max_batch_tokens"),
    ("bad.toml", "port = [\n", "not valid TOML"),
    ("bad.yaml", "- a list\n", "table of settings"),
    ("bad.ini", "port=1\n", "must end in .toml"),
])
def test_a_bad_config_file_is_refused_by_name(tmp_path, name, text, message, capsys):
    config = tmp_path / name
    config.write_text(text)
    with pytest.raises(ConfigFileError, match=message):
        read_config_file(config)
    assert main(["serve", "--config", str(config), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_missing_config_file(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["flag", "variable", "file"])
def test_log_level_is_validated(where, tmp_path, monkeypatch, capsys):
    args = ["serve", "--store", str(tmp_path / "store"), "--no-demo"]
    if where == "flag":
        args += ["--log-level", "verbose"]
    elif where == "variable":
        monkeypatch.setenv("DELTASERVE_LOG_LEVEL", "verbose")
    else:
        (tmp_path / "c.toml").write_text('log_level = "verbose"\n')
        args += ["--config", str(tmp_path / "c.toml")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "log_level" in err and "'debug'" in err
    with pytest.raises(ValidationError):
        Settings(log_level="verbose")


def test_unknown_variables_are_named_with_the_nearest_setting():
    environ = {"DELTASERVE_MAX_BATCH_TOKEN": "5", "DELTASERVE_PORT": "1", "DELTASERVE_URL": "http://x",
               "DELTASERVE_TEST_THREADS": "2", "DELTASERVE_WHATEVER": "1", "OTHER": "1", "deltaserve_prot": "1"}
    problems = unknown_variables(environ)
    assert len(problems) == 3
    assert any("DELTASERVE_MAX_BATCH_TOKEN (did you mean DELTASERVE_MAX_BATCH_TOKENS?)" in p for p in problems)
    assert any(p.startswith("DELTASERVE_WHATEVER:") for p in problems)
    assert any("deltaserve_prot (did you mean DELTASERVE_PORT?)" in p for p in problems)


def test_serve_warns_about_an_unknown_variable_at_start(tmp_path, monkeypatch, caplog):
    """Through `deltaserve serve` itself; the backbone folder is empty, so it stops right after the warnings."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DELTASERVE_MAX_BATCH_TOKEN", "5")
    (tmp_path / "no-model").mkdir()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with caplog.at_level(logging.WARNING, logger="deltaserve"), pytest.raises(SystemExit):
            main(["serve", "--port", str(free_port()), "--store", str(tmp_path / "store"),
                  "--backbone", str(tmp_path / "no-model"), "--no-demo", "--log-level", "warning"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert any("DELTASERVE_MAX_BATCH_TOKEN (did you mean DELTASERVE_MAX_BATCH_TOKENS?)" in r.getMessage()
               for r in caplog.records)


def test_push_refuses_two_tokens_or_an_empty_file(tmp_path, monkeypatch, capsys):
    """`push --token-file` once silently won over `--token`, and an empty file meant no token at all."""
    delta = tmp_path / "d.safetensors"
    delta.write_bytes(b"not used: refused before any request")
    empty, good = tmp_path / "empty", tmp_path / "good"
    empty.write_text("\n")
    good.write_text("s3cret\n")
    base = ["push", str(delta), "--name", "t", "--url", "http://127.0.0.1:9"]
    assert main([*base, "--token", "a", "--token-file", str(good)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--token-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    monkeypatch.setenv("DELTASERVE_ADMIN_TOKEN", "a")
    monkeypatch.setenv("DELTASERVE_ADMIN_TOKEN_FILE", str(good))
    assert main(base) == 2
    assert "both set" in capsys.readouterr().err


def test_client_token_sources(tmp_path):
    from server.settings import client_token

    (tmp_path / "t").write_text("from-file\n")
    assert client_token(None, tmp_path / "t", {}) == "from-file"
    assert client_token("flag", None, {"DELTASERVE_ADMIN_TOKEN_FILE": str(tmp_path / "t")}) == "flag"  # flag wins
    assert client_token(None, None, {"DELTASERVE_ADMIN_TOKEN_FILE": str(tmp_path / "t")}) == "from-file"
    assert client_token(None, None, {}) is None
    with pytest.raises(ValueError, match="is empty"):
        client_token("", None, {})


def test_train_takes_a_token_file_and_checks_it_first(tmp_path, capsys):
    (tmp_path / "empty").write_text("")
    assert main(["train", "--method", "lora", "--task-type", "sequence-classification", "--train", "x.tsv",
                 "--eval", "y.tsv", "--push", "http://127.0.0.1:9", "--name", "t",
                 "--token-file", str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_push_without_a_name_is_refused_before_the_work(tmp_path, capsys):
    """`train` and `import-finetuned` check --push the same way (training.cli.push_token), with the same words."""
    train = ["train", "--method", "lora", "--task-type", "sequence-classification", "--train", "x.tsv",
             "--eval", "y.tsv", "--push", "http://127.0.0.1:9"]
    imported = ["import-finetuned", str(tmp_path / "missing"), "--out", str(tmp_path / "d.safetensors"),
                "--push", "http://127.0.0.1:9"]
    for argv in (train, imported):
        assert main(argv) == 2
        assert capsys.readouterr().err == "error: --push needs --name\n"
    assert not (tmp_path / "d.safetensors").exists()


def test_every_variable_the_documents_name_exists():
    """Each DELTASERVE_* that README.md, docs/, the Dockerfile and the compose files name is a setting's variable
    or one read elsewhere (OTHER_VARIABLES): no document teaches a variable the server would ignore."""
    import re
    from pathlib import Path

    from server.settings import OTHER_VARIABLES

    repo = Path(__file__).resolve().parents[1]
    known = {"DELTASERVE_" + name.upper() for name in Settings.model_fields} | set(OTHER_VARIABLES)
    files = [repo / "README.md", repo / "Dockerfile", *repo.glob("docker-compose*.yml"), *(repo / "docs").glob("*.md")]
    named = {(path.name, name) for path in files
             for name in re.findall(r"DELTASERVE_[A-Z0-9_]*[A-Z0-9]", path.read_text())}
    # <NAME> placeholders and examples of a misspelling are not variables.
    unknown = sorted((where, name) for where, name in named if name not in known
                     and name not in ("DELTASERVE_MAX_BATCH_TOKEN",))
    assert not unknown, unknown


def test_every_setting_is_documented():
    """docs/deployment.md's settings table names every flag with its variable (the table is written by hand)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    missing = [name for name in Settings.model_fields
               if f"`--{name.replace('_', '-')}`" not in text
               or (f"`DELTASERVE_{name.upper()}`" not in text and name not in RAY_ROW)]
    assert not missing, f"add to the settings table of docs/deployment.md: {missing}"


# The Ray Serve settings share one row of the table, whose variable column reads "DELTASERVE_RAY, ...".
RAY_ROW = {"replicas", "max_replicas", "target_ongoing_requests", "ray_replica_cpus", "ray_address"}
