"""A workshop room on one box: deployable as a Space, safe launch settings, login, per-session state, no path tricks.

The app is started in-process on 127.0.0.1 exactly as `app.py` starts it (`create_app`, `launch_kwargs`) and driven
with `gradio_client`, one client per simulated browser.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import os
import sqlite3
import subprocess
import threading
import zipfile
from pathlib import Path

import gradio
import httpx
import pytest
import yaml

import app as app_module
from finetune import FinetuneError
from finetune.arena import install_adapter
from finetune.security import saving
from finetune.settings import Settings
from finetune.votes import VoteStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path / "home"))
    for name in ("FINETUNE_AUTH", "FINETUNE_ADMINS", "FINETUNE_MAX_UPLOAD_MB", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


@pytest.fixture
def tiny_settings(tiny_llama) -> Settings:
    return Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)


@contextlib.contextmanager
def running_app(settings: Settings, port: int, **parts):
    """The app as `python app.py` serves it (same queue and launch settings), on 127.0.0.1:port."""
    blocks = app_module.create_app(settings, **parts)
    blocks.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app_module.launch_kwargs()
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


def client(url: str, auth: tuple[str, str] | None = None):
    from gradio_client import Client

    return Client(url, auth=auth, verbose=False, analytics_enabled=False, download_files=False)


def questions(chat: list[dict]) -> list[str]:
    """The user turns of a Chatbot value (gradio 6 gives each message's content as a list of typed parts)."""
    texts = []
    for message in chat:
        if message["role"] == "user":
            content = message["content"]
            texts.append(content if isinstance(content, str) else "".join(p.get("text", "") for p in content))
    return texts


# --- deployable ----------------------------------------------------------------------------------------


def test_readme_front_matter_describes_a_gradio_space():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
    assert (ROOT / meta["app_file"]).is_file() and meta["app_file"] == "app.py"
    assert str(meta["python_version"]).startswith("3.")
    assert 0 < len(meta["short_description"]) <= 60  # the Hub's limit
    assert meta["suggested_hardware"] == "cpu-basic"
    assert "\n## Deploy to Spaces\n" in text


def test_launch_settings_are_safe_by_default(home, monkeypatch):
    kwargs = app_module.launch_kwargs()
    assert kwargs["share"] is False and kwargs["auth"] is None
    allowed = [Path(p) for p in kwargs["allowed_paths"]]
    assert allowed and all(p.is_relative_to(home) and p != home for p in allowed)  # not the model cache or votes
    assert kwargs["max_file_size"] == "100mb"
    monkeypatch.setenv("FINETUNE_AUTH", "ann:pw1, bob:pw2")
    monkeypatch.setenv("FINETUNE_MAX_UPLOAD_MB", "5")
    kwargs = app_module.launch_kwargs()
    assert kwargs["auth"] == [("ann", "pw1"), ("bob", "pw2")] and kwargs["max_file_size"] == "5mb"


def test_login_is_required_when_auth_is_set(home, tiny_settings, free_port, monkeypatch):
    monkeypatch.setenv("FINETUNE_AUTH", "ann:pw1,bob:pw2")
    with running_app(tiny_settings, free_port) as url:
        with pytest.raises(Exception):  # noqa: B017 (gradio_client raises a bare ValueError/HTTP error here)
            client(url).predict(api_name="/leaderboard")
        with pytest.raises(Exception):  # noqa: B017
            client(url, auth=("ann", "wrong")).predict(api_name="/leaderboard")
        table, _csv = client(url, auth=("ann", "pw1")).predict(api_name="/leaderboard")
    assert table["headers"][0] == "model"


# --- one screen per browser ---------------------------------------------------------------------------


def test_two_browsers_keep_their_own_arena_histories(home, tiny_settings, free_port):
    with running_app(tiny_settings, free_port) as url:
        ann, bob = client(url), client(url)
        ann.predict("What is Lamini?", 16, api_name="/arena")
        bob.predict("Who are you?", 16, api_name="/arena")
        ann_chats = ann.predict("And what else?", 16, api_name="/arena")[:3]
        bob.predict(api_name="/arena_clear")  # Bob's clear leaves Ann's history alone
        bob_chats = bob.predict("Hello?", 16, api_name="/arena")[:3]
    assert all(questions(chat) == ["What is Lamini?", "And what else?"] for chat in ann_chats)
    assert all(questions(chat) == ["Hello?"] for chat in bob_chats)


def test_a_vote_needs_this_browsers_own_blind_round(home, tiny_settings, free_port):
    with running_app(tiny_settings, free_port) as url:
        ann, bob = client(url), client(url)
        ann.predict("What is Lamini?", 16, 0.7, 0.95, True, True, api_name="/arena")  # Ann: a blind round
        with pytest.raises(Exception, match="blind mode"):
            bob.predict("A", api_name="/vote")  # Bob has no round of his own: Ann's is not his to vote on
        verdict = ann.predict("A", api_name="/vote")[-3]
    assert "Thanks!" in verdict


def _module_level_state(path: Path) -> list[str]:
    """Module-level names bound to mutable values that are not CONSTANTS, and any `global` statement."""
    tree = ast.parse(path.read_text())
    found = [f"global {', '.join(n.names)}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            for name in (n.id for n in ast.walk(target) if isinstance(n, ast.Name)):
                if not name.isupper() and not name.startswith("__"):
                    found.append(name)
    return found


def test_ui_modules_hold_no_per_user_state_in_module_globals():
    modules = sorted((ROOT / "finetune" / "ui").glob("*.py"))
    assert len(modules) >= 4
    assert {m.name: _module_level_state(m) for m in modules} == {m.name: [] for m in modules}


# --- path tricks and uploads ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_files(tiny_llama, tmp_path_factory) -> Path:
    from tests.test_generate_backends import make_tiny_adapter

    return make_tiny_adapter(tiny_llama, tmp_path_factory.mktemp("adapter"))


@pytest.mark.parametrize("name", ["../../evil", "/etc/passwd", "a\x00b/../../c", "x" * 500, "..\\..\\win", "ünï côde"])
def test_uploaded_adapter_names_stay_inside_the_data_dir(home, adapter_files, name):
    info = install_adapter(list(adapter_files.iterdir()), name)
    assert info.path.parent == home / "adapters" and info.path.is_dir()
    assert len(info.path.name) <= 64 and "/" not in info.name and "\x00" not in info.name


def test_two_uploads_of_one_name_at_once_give_one_whole_adapter_and_a_clear_refusal(home, adapter_files):
    """A workshop room: two participants upload under one name at the same moment. They shared one temporary
    folder, so one could install the other's half-copied files or fail with a bare OSError."""
    barrier, done, refused = threading.Barrier(2), [], []

    def upload():
        barrier.wait()
        try:
            done.append(install_adapter(list(adapter_files.iterdir()), "team-a"))
        except FinetuneError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 1 and refused == ["An adapter named 'team-a' exists already: choose another name."], refused
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (done[0].path / f).read_bytes() == (adapter_files / f).read_bytes()
    assert [p.name for p in (home / "adapters").iterdir()] == ["team-a"]  # no temporary folder left


@pytest.mark.parametrize("name", ["", "..", "/", "\x00", "../.."])
def test_an_adapter_name_with_nothing_safe_left_is_refused(home, adapter_files, name):
    with pytest.raises(FinetuneError, match="Give the uploaded adapter a name"):
        install_adapter(list(adapter_files.iterdir()), name)


def _zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16  # a symlink entry
            z.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    "members,link",
    [
        ({"../../escape/adapter_config.json": b"{}", "adapter_model.safetensors": b"x"}, None),
        ({"/abs/adapter_config.json": b"{}", "adapter_model.safetensors": b"x"}, None),
        ({"adapter_model.safetensors": b"x"}, "adapter_config.json"),
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_unsafe_adapter_archives_are_refused_before_extraction(home, tmp_path, members, link):
    archive = _zip(tmp_path / "evil.zip", members, link)
    with pytest.raises(FinetuneError, match="unsafe path"):
        install_adapter([archive], "evil")
    assert not (home / "adapters" / "evil").exists() and not (tmp_path / "escape").exists()
    assert not list((home / "adapters").glob("*/adapter_config.json"))


def test_adapter_zip_in_a_subfolder_installs_and_oversized_uploads_are_refused(
    home, tmp_path, adapter_files, monkeypatch
):
    archive = _zip(tmp_path / "ok.zip", {f"run/adapter/{f.name}": f.read_bytes() for f in adapter_files.iterdir()})
    info = install_adapter([archive], "from-zip")
    assert sorted(p.name for p in info.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.setenv("FINETUNE_MAX_UPLOAD_MB", "0.001")
    with pytest.raises(FinetuneError, match="the limit is"):
        install_adapter([archive], "too-big")
    assert not (home / "adapters" / "too-big").exists()


@pytest.mark.parametrize("source", ["/etc/passwd", "../../../../etc/passwd", "/etc/hosts.csv", "runs/../../x.jsonl"])
def test_the_data_api_reads_no_server_files(home, tiny_settings, free_port, source):
    with running_app(tiny_settings, free_port) as url, pytest.raises(Exception, match="bundled data set"):
        client(url).predict(source=source, api_name="/dataset_stats")


def test_the_server_serves_run_files_only(home, tiny_settings, free_port):
    (home / "runs" / "r1").mkdir(parents=True)
    (home / "runs" / "r1" / "eval.csv").write_text("a,b\n")
    (home / "secret.txt").write_text("votes and models live here")
    with running_app(tiny_settings, free_port) as url:
        get = lambda path: httpx.get(f"{url}gradio_api/file={path}", timeout=10).status_code  # noqa: E731
        assert get(home / "runs" / "r1" / "eval.csv") == 200
        assert get(home / "secret.txt") != 200
        assert get(home / "runs" / ".." / "secret.txt") != 200
        assert get("/etc/passwd") != 200
        assert get(os.path.abspath(app_module.__file__)) != 200  # the app's own code is not served either


@pytest.mark.parametrize("run", ["OUTSIDE", "../outside", "../../../../etc"])
def test_the_evaluate_api_takes_only_listed_runs(home, tmp_path, tiny_settings, free_port, run):
    outside = tmp_path / "outside"  # looks like a run (config.yaml + adapter) but lies outside the data dir
    (outside / "adapter").mkdir(parents=True)
    (outside / "config.yaml").write_text("{}")
    (outside / "adapter" / "adapter_config.json").write_text("{}")
    run = str(outside) if run == "OUTSIDE" else run
    with running_app(tiny_settings, free_port) as url, pytest.raises(Exception, match="not in the list of choices"):
        client(url).predict(run, 2, 16, False, "test order", api_name="/evaluate")
    assert sorted(p.name for p in outside.rglob("*")) == ["adapter", "adapter_config.json", "config.yaml"]


# --- a full disk: the data dir turns read-only while the app serves ---------------------------------------


@contextlib.contextmanager
def read_only(path: Path):
    """Make `path` read-only for this process: a read-only bind mount as root (root ignores file modes)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mount = ["mount", "--bind", str(path), str(path)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("running as root where bind mounts are not allowed: no way to make a read-only folder")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path), str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


def test_a_read_only_data_dir_gives_clear_messages_and_keeps_what_was_saved(
    home, tiny_settings, free_port, adapter_files
):
    install_adapter(list(adapter_files.iterdir()), "saved-before")
    with running_app(tiny_settings, free_port) as url:
        ann = client(url)
        ann.predict("What is Lamini?", 16, 0.7, 0.95, True, True, api_name="/arena")
        ann.predict("A", api_name="/vote")  # saved
        ann.predict("What is LoRA?", 16, 0.7, 0.95, True, True, api_name="/arena")
        with read_only(home):
            with pytest.raises(Exception, match="Could not save your vote: the data folder .* is read-only"):
                ann.predict("B", api_name="/vote")
            table, _csv = ann.predict(api_name="/leaderboard")  # reading still works
            assert [row[0] for row in table["data"]]
            with pytest.raises(FinetuneError, match="is read-only"), saving("the adapter"):
                install_adapter(list(adapter_files.iterdir()), "after")
        assert [v.prompt for v in VoteStore().votes()] == ["What is Lamini?"]
        ann.predict("B", api_name="/vote")  # writable again: the same ballot goes through
    assert [v.prompt for v in VoteStore().votes()] == ["What is Lamini?", "What is LoRA?"]
    assert (home / "adapters" / "saved-before" / "adapter_config.json").is_file()
    assert not (home / "adapters" / "after").exists()


@pytest.mark.parametrize(
    "error, says",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "is full"),
        (OSError(errno.EROFS, "Read-only file system"), "is read-only"),
        (sqlite3.OperationalError("database or disk is full"), "is full"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "is read-only"),
    ],
)
def test_saving_names_the_cause_and_passes_other_errors_through(home, error, says):
    with pytest.raises(FinetuneError, match=f"Could not save the run: the data folder .* {says}"), saving("the run"):
        raise error
    with pytest.raises(FileNotFoundError), saving("the run"):
        raise FileNotFoundError(errno.ENOENT, "gone")


# --- login: runs belong to their user -------------------------------------------------------------------


@pytest.fixture
def sleeper(tmp_path) -> str:
    """Stands in for the trainer (`python -m finetune train ...`): sleeps until stopped, so no training is needed."""
    script = tmp_path / "sleeper"
    script.write_text("#!/bin/sh\nsleep 60\n")
    script.chmod(0o755)
    return str(script)


def test_with_login_runs_belong_to_their_user(home, tiny_settings, free_port, monkeypatch, sleeper):
    from finetune.runner import Runner

    monkeypatch.setenv("FINETUNE_AUTH", "ann:pw1,bob:pw2,boss:pw3")
    monkeypatch.setenv("FINETUNE_ADMINS", "boss")
    monkeypatch.setenv("FINETUNE_MAX_QUEUED_RUNS", "2")
    runner = Runner(home / "runs", python=sleeper, poll_interval=0.1)
    try:
        with running_app(tiny_settings, free_port, runner=runner) as url:
            ann, bob, boss = client(url, ("ann", "pw1")), client(url, ("bob", "pw2")), client(url, ("boss", "pw3"))
            # The Train form: model, data, template, quantization, steps, lr, batch, length, r, then the advanced ones.
            form = [tiny_settings.base_model, "lamini_docs", "qa", "none", 3, 1e-3, 2, 48, 4]
            form += [8, 0.0, 1, 0, 0, 2, 20, 1, "float32", "all-linear", False, False]
            first, _ = ann.predict(*form, api_name="/train_start")
            second, _ = ann.predict(*form, api_name="/train_start")
            assert runner.status(first)["state"] == "running" and runner.status(second)["queue_position"] == 1
            with pytest.raises(Exception, match="the limit is 2"):
                ann.predict(*form, api_name="/train_start")
            theirs, _ = bob.predict(*form, api_name="/train_start")  # Bob's own quota
            with pytest.raises(Exception, match=f"Run {first} belongs to ann: only its owner or an admin"):
                bob.predict(first, api_name="/train_stop")
            with pytest.raises(Exception, match="belongs to ann"):
                bob.predict(second, api_name="/train_stop")
            assert boss.predict(second, api_name="/train_stop") == "Cancelled."  # an admin may stop any run
            assert "Stopping" in ann.predict(first, api_name="/train_stop")
            assert runner.wait(first, timeout=30)["state"] == "stopped"
            assert "Stopping" in bob.predict(theirs, api_name="/train_stop")  # his, now running
            assert runner.wait(theirs, timeout=30)["state"] == "stopped"
    finally:
        runner.close()
    assert {i.run_id: i.owner for i in runner.runs()} == {first: "ann", second: "ann", theirs: "bob"}


def test_a_run_over_the_step_limit_is_refused_before_it_starts(home, tiny_llama, monkeypatch, sleeper):
    from finetune.config import DataConfig, ModelSpec, TrainConfig
    from finetune.runner import Runner

    monkeypatch.setenv("FINETUNE_MAX_TRAIN_STEPS", "50")
    runner = Runner(home / "runs", python=sleeper)
    try:
        with pytest.raises(FinetuneError, match="60 steps is above this box's limit of 50"):
            cfg = TrainConfig(model=ModelSpec(tiny_llama), data=DataConfig(max_rows=20), max_steps=60)
            runner.submit(cfg, limits=Settings.current())  # the Train tab passes the box's limits
        assert runner.runs() == []
    finally:
        runner.close()


# --- faults: a killed trainer, an app restart mid-run, a full disk ------------------------------------------


def test_restart_mid_run_then_a_killed_trainer_loses_nothing_saved(home, tiny_llama):
    import signal
    import time

    from finetune.config import DataConfig, ModelSpec, TrainConfig
    from finetune.runner import Runner
    from finetune.runs import RunDir

    cfg = TrainConfig(
        model=ModelSpec(tiny_llama),
        data=DataConfig(max_rows=40),
        max_length=48,
        batch_size=2,
        max_steps=400,
        save_steps=2,
        logging_steps=1,
        eval_rows=0,
        mixed_precision="no",
    )
    first = Runner(home / "runs", poll_interval=0.1)
    run_id = first.submit(cfg, owner="ann")
    run_dir = home / "runs" / run_id
    run = RunDir(run_dir)
    deadline = time.monotonic() + 120
    while run.latest_checkpoint() is None:  # trained far enough to have saved something
        assert time.monotonic() < deadline and first.status(run_id)["state"] in ("queued", "running")
        time.sleep(0.1)
    first.close()  # the app goes away; the trainer does not

    second = Runner(home / "runs", poll_interval=0.1)  # the app restarted: it finds the run still training
    try:
        status = second.status(run_id)
        assert status["state"] == "running" and second.active() == run_id and status["owner"] == "ann"
        pid = status["pid"]
        assert run.read_status()["step"] < cfg.max_steps
        saved = run.latest_checkpoint().path
        metrics_before = run.read_metrics()
        os.kill(pid, signal.SIGKILL)  # out of memory, or a careless kill -9
        status = second.wait(run_id, timeout=60)
        assert status["state"] == "failed" and "SIGKILL" in status["message"] and "Resume" in status["message"]
        assert saved.is_dir() and run.read_metrics()[: len(metrics_before)] == metrics_before
        assert second.active() is None  # the device is free for the next run

        second.resume(run_id)  # continues from the last checkpoint, not from step 0
        deadline = time.monotonic() + 120
        while run.read_status().get("step", 0) <= int(saved.name.split("-")[1]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "Resuming" in (run_dir / "train.log").read_text() or "resum" in str(run.read_status()).lower()
        second.stop(run_id)
        assert second.wait(run_id, timeout=60)["state"] == "stopped"
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
    finally:
        second.close()


def test_a_read_only_data_dir_refuses_new_runs_clearly(home, tiny_llama, sleeper):
    from finetune.config import DataConfig, ModelSpec, TrainConfig
    from finetune.runner import Runner

    runner = Runner(home / "runs", python=sleeper, poll_interval=0.1)
    cfg = TrainConfig(model=ModelSpec(tiny_llama), data=DataConfig(max_rows=20), max_steps=5)
    try:
        kept = runner.submit(cfg)
        runner.stop(kept)
        runner.wait(kept, timeout=30)
        with read_only(home), pytest.raises(FinetuneError, match="Could not save the new run: .* is read-only"):
            runner.submit(cfg)
        assert [i.run_id for i in runner.runs()] == [kept]
    finally:
        runner.close()


def test_python_app_py_serves_its_page_and_preloads_the_tokenizer(free_port, tmp_path):
    """`python app.py` itself (main(): preload thread + launch) serves the page; a start-up import race once
    killed it before it served anything."""
    import sys
    import time

    env = {**os.environ, "FINETUNE_HOME": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    env["FINETUNE_MODEL_CACHE"] = os.environ.get("FINETUNE_MODEL_CACHE") or str(
        Path.home() / ".cache" / "finetune-workbench" / "models"
    )
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(free_port)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline and proc.poll() is None and status != 200:
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(f"http://127.0.0.1:{free_port}/", timeout=2).status_code
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_preload_parses_local_models_and_leaves_hub_models_alone(monkeypatch, tiny_llama):
    import finetune.models

    seen = []
    monkeypatch.setattr(finetune.models, "load_tokenizer", lambda spec: seen.append(("tokenizer", spec.source)))
    monkeypatch.setattr(finetune.models, "import_model_code", lambda spec: seen.append(("code", spec.source)))
    monkeypatch.setenv("FINETUNE_BASE_MODEL", tiny_llama)
    monkeypatch.setenv("FINETUNE_REFERENCE_MODEL", "HuggingFaceTB/SmolLM2-360M-Instruct")
    app_module.preload()
    assert seen == [("tokenizer", tiny_llama), ("code", tiny_llama)]
