import zipfile

import pytest

from finetune import FinetuneError
from finetune.security import extract_zip, parse_auth, safe_name, safe_path
from finetune.settings import Settings


@pytest.mark.parametrize(
    "name, expected",
    [
        ("my run", "my-run"),
        ("../../etc/passwd", "etc-passwd"),
        ("/abs/path", "abs-path"),
        ("a\x00b", "ab"),
        ("..", "unnamed"),
        ("", "unnamed"),
        ("Élan vital", "Elan-vital"),
        ("x" * 500, "x" * 64),
    ],
)
def test_safe_name(name, expected):
    assert safe_name(name) == expected


@pytest.mark.parametrize("part", ["../outside", "/etc/passwd", "a/../../b", "runs/../../x"])
def test_safe_path_refuses_escapes(tmp_path, part):
    with pytest.raises(FinetuneError, match="outside"):
        safe_path(part, root=tmp_path)


def test_safe_path_refuses_nul_and_accepts_inside(tmp_path):
    with pytest.raises(FinetuneError, match="NUL"):
        safe_path("a\x00b", root=tmp_path)
    assert safe_path("runs", "r1", "adapter", root=tmp_path) == (tmp_path / "runs/r1/adapter").resolve()


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("bad", ["../evil.txt", "/abs.txt", "a/../../evil.txt"])
def test_zip_with_unsafe_member_is_refused(tmp_path, bad):
    archive = _zip(tmp_path / "a.zip", {"adapter_config.json": "{}", bad: "x"})
    with pytest.raises(FinetuneError, match="unsafe path"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_zip_size_and_count_limits(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"big.bin": b"0" * 5000, "b.txt": "x"})
    with pytest.raises(FinetuneError, match="unpacks to more"):
        extract_zip(archive, tmp_path / "o1", max_bytes=4000)
    with pytest.raises(FinetuneError, match="at most 1"):
        extract_zip(archive, tmp_path / "o2", max_files=1)
    assert (extract_zip(archive, tmp_path / "o3") / "b.txt").read_text() == "x"


def test_auth_and_limits_from_env(monkeypatch, tmp_path):
    assert parse_auth("") == []
    assert parse_auth("ann:pw1, bob:pw:2") == [("ann", "pw1"), ("bob", "pw:2")]
    users = tmp_path / "users.txt"
    users.write_text("cat:meow\ndog:woof\n")
    assert parse_auth(str(users)) == [("cat", "meow"), ("dog", "woof")]
    with pytest.raises(FinetuneError, match="user:password"):
        parse_auth("nopassword")
    monkeypatch.setenv("FINETUNE_MAX_TRAIN_STEPS", "50")
    monkeypatch.setenv("FINETUNE_MAX_UPLOAD_MB", "2.5")
    limits = Settings.current()
    assert limits.max_train_steps == 50 and limits.max_upload_mb == 2.5 and limits.max_queued_runs == 2
