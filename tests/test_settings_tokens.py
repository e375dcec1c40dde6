"""Tokens can never be empty (an empty admin token once turned authentication off) and can come from files."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.cli import main
from server.settings import Settings


@pytest.mark.parametrize("name", ["admin_token", "api_key"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_token_is_refused(name, value, monkeypatch):
    with pytest.raises(ValidationError, match="empty"):
        Settings(**{name: value})
    monkeypatch.setenv(f"DELTASERVE_{name.upper()}", value)
    with pytest.raises(ValidationError, match="empty"):
        Settings()


def test_serve_refuses_to_start_with_an_empty_token(monkeypatch, tmp_path, capsys):
    assert main(["serve", "--admin-token", "", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "admin_token" in err and "empty" in err
    monkeypatch.setenv("DELTASERVE_ADMIN_TOKEN", "")
    assert main(["serve", "--store", str(tmp_path)]) == 2
    assert "empty" in capsys.readouterr().err


def test_tokens_from_files(monkeypatch, tmp_path, capsys):
    secret = tmp_path / "admin"
    secret.write_text("s3cret-from-file\n")
    assert Settings(admin_token_file=secret).admin_token == "s3cret-from-file"
    monkeypatch.setenv("DELTASERVE_API_KEY_FILE", str(secret))
    assert Settings().api_key == "s3cret-from-file"
    assert "s3cret" not in repr(Settings())  # tokens stay out of logs

    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValidationError, match="empty"):
        Settings(admin_token_file=empty)
    with pytest.raises(ValidationError, match="cannot read"):
        Settings(admin_token_file=tmp_path / "missing")
    with pytest.raises(ValidationError, match="not both"):
        Settings(admin_token="x", admin_token_file=secret)
    # The error printed by `serve` never repeats a token.
    assert main(["serve", "--admin-token", "visible-token", "--admin-token-file", str(secret)]) == 2
    err = capsys.readouterr().err
    assert "not both" in err and "visible-token" not in err and "s3cret" not in err
