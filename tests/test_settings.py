"""Settings: one dataclass read from the environment; README's Configuration table lists exactly its variables."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from finetune import FinetuneError, home
from finetune.settings import ENV_NAMES, OFFLINE_VARS, Settings, offline

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults_from_an_empty_environment():
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.base_model, s.reference_model) == ("gemma-3-270m", "smollm2-135m-instruct")
    assert (s.max_new_tokens, s.generation_concurrency, s.arena_engine) == (512, 0, "auto")
    assert (s.max_upload_mb, s.max_train_steps, s.max_queued_runs) == (100.0, 2000, 2)
    assert s.home == Path.home() / ".cache" / "finetune-workbench" and s.model_cache is None
    assert (s.auth, s.admins, s.app_device, s.model_budget_gb) == ("", ("admin",), "auto", 0.0)
    assert (s.server_name, s.server_port) == ("127.0.0.1", 7860)
    assert all(f.metadata["env"] and f.metadata["help"] for f in dataclasses.fields(Settings))


def test_env_overrides_convert_to_the_field_type():
    s = Settings.from_env(
        {
            "FINETUNE_MAX_TRAIN_STEPS": " 50 ",
            "FINETUNE_MAX_UPLOAD_MB": "2.5",
            "FINETUNE_ADMINS": "boss, ann,",
            "FINETUNE_HOME": "~/wb",
            "FINETUNE_MODEL_CACHE": "/models",
            "GRADIO_SERVER_PORT": "8080",
            "FINETUNE_BASE_MODEL": "",  # empty: the default
        }
    )
    assert s.max_train_steps == 50 and s.max_upload_mb == 2.5 and s.server_port == 8080
    assert s.admins == ("boss", "ann") and s.home == Path.home() / "wb" and s.model_cache == Path("/models")
    assert s.base_model == "gemma-3-270m"


def test_current_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_MAX_QUEUED_RUNS", "5")
    assert Settings.current().max_queued_runs == 5 and Settings.current() is Settings.current()
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "h"))
    assert home() == tmp_path / "h" and home().is_dir()


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("FINETUNE_MAX_TRAIN_STEPS", "abc", "a whole number"),
        ("FINETUNE_MAX_QUEUED_RUNS", "2.5", "a whole number"),
        ("FINETUNE_MAX_UPLOAD_MB", "lots", "a number"),
    ],
)
def test_a_bad_value_names_its_variable(monkeypatch, name, value, words):
    with pytest.raises(FinetuneError, match=re.escape(f"{name} must be {words}, not '{value}'.")):
        Settings.from_env({name: value})
    monkeypatch.setenv(name, value)
    with pytest.raises(FinetuneError, match=name):
        Settings.current()


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " On "])
@pytest.mark.parametrize("name", OFFLINE_VARS)
def test_offline_when_any_variable_says_so(monkeypatch, name, value):
    for other in OFFLINE_VARS:
        monkeypatch.delenv(other, raising=False)
    assert not offline()
    monkeypatch.setenv(name, value)
    assert offline()


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off", "maybe"])
def test_online_otherwise(monkeypatch, value):
    for name in OFFLINE_VARS:
        monkeypatch.setenv(name, value)
    assert not offline()


def test_readme_configuration_table_lists_exactly_the_settings():
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.MULTILINE)
    assert sorted(rows) == sorted(ENV_NAMES)
    # Every FINETUNE_* variable the README mentions anywhere is a setting (`FINETUNE_MAX_*`, the family, is not one).
    mentioned = set(re.findall(r"\bFINETUNE_[A-Z_]*[A-Z]\b", README.read_text()))
    assert mentioned <= set(ENV_NAMES), mentioned - set(ENV_NAMES)
