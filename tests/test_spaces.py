import functools
import importlib.machinery
import inspect
import sys
import types

import pytest
from conftest import make_run  # tests/ is on sys.path (pytest prepends the rootdir of test files)

from finetune import spaces
from finetune.models import ModelPool


def test_gpu_is_identity_off_spaces(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)

    def f(x):
        return x + 1

    assert spaces.gpu(30)(f) is f and not spaces.on_space()


def test_nodeps_install_only_on_a_space_missing_the_package(monkeypatch):
    calls = []
    monkeypatch.setattr(spaces.subprocess, "run", lambda *a, **k: calls.append(a[0]))
    monkeypatch.delenv("SPACE_ID", raising=False)
    spaces.ensure_nodeps_requirements()
    monkeypatch.setenv("SPACE_ID", "me/workbench")
    spaces.ensure_nodeps_requirements()  # installed here already: nothing to do
    assert calls == []
    monkeypatch.setattr(spaces.importlib.util, "find_spec", lambda name: None)
    spaces.ensure_nodeps_requirements()
    assert calls and calls[0][-3:-1] == ["--no-deps", "-r"]


# --- ZeroGPU: every use of the model pool runs under spaces.GPU ------------------------------------------


class _GPUWindow:
    """A fake `spaces` package: `GPU(duration)` opens a window while the wrapped handler runs (generators too)."""

    def __init__(self):
        self.open = 0
        self.wrapped: list[str] = []

    def GPU(self, duration: int = 60):  # noqa: N802 (the real package's name)
        def wrap(fn):
            self.wrapped.append(fn.__name__)

            if inspect.isgeneratorfunction(fn):

                @functools.wraps(fn)
                def stream(*args, **kwargs):
                    self.open += 1
                    try:
                        yield from fn(*args, **kwargs)
                    finally:
                        self.open -= 1

                return stream

            @functools.wraps(fn)
            def call(*args, **kwargs):
                self.open += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.open -= 1

            return call

        return wrap


@pytest.fixture
def zero_gpu(monkeypatch):
    window = _GPUWindow()
    module = types.ModuleType("spaces")
    module.__spec__ = importlib.machinery.ModuleSpec("spaces", None)
    module.GPU = window.GPU
    monkeypatch.setitem(sys.modules, "spaces", module)
    monkeypatch.setenv("SPACE_ID", "me/workbench")
    return window


class GuardedPool(ModelPool):
    """Fails the way a ZeroGPU Space does when a model is used outside `spaces.GPU` (CUDA in the main process)."""

    def __init__(self, window: _GPUWindow):
        super().__init__()
        self.window = window

    def get(self, spec):
        assert self.window.open, f"{spec.source} used outside spaces.GPU"
        return super().get(spec)


def test_every_handler_that_reaches_the_model_pool_runs_under_spaces_gpu(
    zero_gpu, tiny_llama, tmp_path, free_port, monkeypatch
):
    from gradio_client import Client

    from finetune.guided import Guide
    from finetune.runner import Runner
    from finetune.settings import Settings
    from finetune.ui import build_app

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    make_run(tmp_path, tiny_llama, "tiny-run")
    pool = GuardedPool(zero_gpu)
    runner = Runner(tmp_path / "runs", poll_interval=0.1)
    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)
    app = build_app(settings, pool=pool, runner=runner).queue()
    app.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{free_port}/", verbose=False)
        status, *_ = client.predict("tiny-run", 2, 16, False, "biggest wins", api_name="/evaluate")
        assert "2 held-out questions" in status
        result = client.predict("What is Lamini?", 16, 0.7, 0.95, True, False, api_name="/arena")
        assert all("Error" not in str(s) for s in result[3:6]), result[3:6]
        steps = list(Guide(runner, pool, poll_interval=0.1).follow("tiny-run"))  # the guided measure step
        assert steps[-1].done and steps[-1].result["loss_after"] > 0, steps[-1].message
    finally:
        app.close()
        runner.close()
    assert pool.loaded() and not zero_gpu.open
    assert {"evaluate_run", "heldout_losses"} <= set(zero_gpu.wrapped)
