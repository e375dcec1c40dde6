"""The `deltaserve` command: inspect, settings from flags and environment, the command list.
(`push` and `serve` run against a real server in test_http_lifecycle.py.)"""

from __future__ import annotations

import json
import sys

import pytest
from delta_builders import build_delta

from adapters_store.format import parse_delta
from server.cli import build_parser, main, settings_from_args


def test_inspect_with_and_without_backbone(tiny_backbone, tokenizer, tmp_path, capsys):
    data = build_delta(tiny_backbone, parts=("keep", "lora", "sparse", "bias", "norms", "head_keep", "pasta"),
                       pooler_head=True, description="all parts")
    path = tmp_path / "d.safetensors"
    path.write_bytes(data)
    expected = parse_delta(data, tiny_backbone.spec()).bytes_by_part()

    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes_by_part"] == expected and report["file_bytes"] == len(data)
    assert {"BiasDelta", "NormDelta", "EmbeddingShift"} <= set(expected)
    assert report["metadata"]["description"] == "all parts" and "not validated" in report["validation"]

    folder = tmp_path / "backbone"
    tiny_backbone.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["inspect", str(path), "--backbone", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "valid for backbone backbone" in text and "KeepMask" in text and "PastaVectors" in text

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(build_delta(tiny_backbone, metadata={"labels": "[1, 2]"}))
    assert main(["inspect", str(broken), "--backbone", str(folder)]) == 1
    assert "labels" in capsys.readouterr().err


def test_serve_flags_win_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTASERVE_PORT", "9001")
    monkeypatch.setenv("DELTASERVE_STORE", str(tmp_path / "env-store"))
    monkeypatch.setenv("DELTASERVE_ADMIN_TOKEN", "from-env")
    monkeypatch.setenv("DELTASERVE_MAX_BATCH_TOKENS", "1234")
    parser = build_parser()
    settings = settings_from_args(parser.parse_args(["serve", "--port", "9002", "--no-demo"]))
    assert settings.port == 9002 and settings.store == str(tmp_path / "env-store")
    assert settings.admin_token == "from-env" and settings.max_batch_tokens == 1234 and settings.demo is False
    defaults = settings_from_args(parser.parse_args(["serve", "--admin-token", "flag", "--batch-wait-ms", "3.5"]))
    assert defaults.admin_token == "flag" and defaults.batch_wait_ms == 3.5 and defaults.demo is None
    monkeypatch.delenv("DELTASERVE_PORT")
    assert settings_from_args(parser.parse_args(["serve"])).port == 8000


def test_every_command_is_there(capsys):
    # `python -m server` itself runs in test_http_lifecycle.py (SIGTERM test).
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("serve", "inspect", "push", "train", "import-peft"):
        assert command in out
    assert main([]) == 2


class _Exited(Exception):
    pass


@pytest.mark.parametrize(("outcome", "code"), [(lambda: 0, 0), (lambda: 3, 3), (lambda: sys.exit(2), 2),
                                               (lambda: sys.exit("bad --flag"), 1)])
def test_the_command_exits_with_mains_status_without_the_final_collection(monkeypatch, capsys, outcome, code):
    import server.cli as cli

    def fake_exit(status: int) -> None:
        raise _Exited(status)

    ran_atexit: list[bool] = []
    monkeypatch.setattr(cli, "main", outcome)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    # The real atexit handlers must not run inside the test process: weakref.finalize's would stop
    # every later finalizer of the session (the Triton slot tables free a task's slot by one).
    monkeypatch.setattr("atexit._run_exitfuncs", lambda: ran_atexit.append(True))
    with pytest.raises(_Exited) as exited:
        cli.command()
    assert exited.value.args == (code,) and ran_atexit == [True]
    if code == 1:
        assert "bad --flag" in capsys.readouterr().err
