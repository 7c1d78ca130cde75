import multiprocessing
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


# --- ZeroGPU: every handler that reaches the model pool runs under the real spaces.GPU --------------------------


@pytest.fixture
def zero_gpu(monkeypatch):
    """The real `spaces` package's ZeroGPU wrappers, less what needs Hugging Face's GPU service (the scheduler) and a
    GPU (moving tensors): each call's arguments are pickled into a worker forked from this process, and its results
    (each yielded value of a generator) pickled back, as on a ZeroGPU Space. The app's models stay on the CPU here."""
    pytest.importorskip("spaces")
    from spaces.config import Config

    monkeypatch.setattr(Config, "zero_gpu", True)
    # Its torch part moves tensors to the GPU the scheduler grants (and needs a CUDA build): nothing to move here.
    no_gpu = types.ModuleType("spaces.zero.torch")
    for name in ("unpatch", "init", "move", "enter_mode"):
        setattr(no_gpu, name, lambda *args, **kwargs: None)
    no_gpu.size = lambda: 0
    monkeypatch.setitem(sys.modules, "spaces.zero.torch", no_gpu)
    from spaces.zero import client, decorator, wrappers

    granted = types.SimpleNamespace(allowToken="token", nvidiaIndex=0, nvidiaUUID="GPU-test", idle=True)
    monkeypatch.setattr(client, "schedule", lambda **kwargs: granted)
    monkeypatch.setattr(client, "allow", lambda token: None)
    monkeypatch.setattr(client, "release", lambda token, **kwargs: None)
    monkeypatch.setattr(client, "get_duration_seconds", lambda *args: 600)
    monkeypatch.setenv("SPACE_ID", "me/workbench")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setenv("FINETUNE_APP_DEVICE", "cpu")  # the Space's GPU, played by this CPU
    from finetune.hardware import machine

    machine.cache_clear()
    before = set(multiprocessing.active_children())
    yield wrappers
    for worker in set(multiprocessing.active_children()) - before:  # the forked workers wait for more calls
        worker.kill()
        worker.join(5)
    decorator.decorated_cache.clear()
    machine.cache_clear()


class WorkerPool(ModelPool):
    """Fails the way a ZeroGPU Space does when a model is used outside `spaces.GPU`: no CUDA in the app's process."""

    def get(self, spec):
        from spaces.zero import wrappers

        assert wrappers.forked, f"{spec.source} used outside spaces.GPU, in the app's own process"
        return super().get(spec)


def test_every_handler_that_reaches_the_model_pool_runs_under_spaces_gpu(
    zero_gpu, tiny_llama, tmp_path, free_port, monkeypatch
):
    """The Evaluate tab, the Arena and the guided path's measurement, called as a browser calls them, through the
    real ZeroGPU wrappers: their arguments and what they return or yield pickle (the pool as its handle), and the
    models load in the forked worker only. Before: PicklingError on the pool's lock, the progress lambda and the
    cancel Event."""
    from gradio_client import Client

    from finetune.guided import Guide
    from finetune.runner import Runner
    from finetune.settings import Settings
    from finetune.ui import build_app

    monkeypatch.setenv("FINETUNE_HOME", str(tmp_path))
    make_run(tmp_path, tiny_llama, "tiny-run")
    pool = WorkerPool()
    runner = Runner(tmp_path / "runs", poll_interval=0.1)
    settings = Settings(base_model=tiny_llama, reference_model=tiny_llama, max_new_tokens=32)
    app = build_app(settings, pool=pool, runner=runner).queue()
    app.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{free_port}/", verbose=False)
        status, *_ = client.predict("tiny-run", 2, 16, False, "biggest wins", api_name="/evaluate")
        assert "2 held-out questions" in status, status
        result = client.predict("What is Lamini?", 16, 0.7, 0.95, True, False, api_name="/arena")
        assert all("Error" not in str(s) for s in result[3:6]), result[3:6]
        steps = list(Guide(runner, pool, poll_interval=0.1).follow("tiny-run"))  # the guided measure step
        assert steps[-1].done and steps[-1].result["loss_after"] > 0, steps[-1].message
    finally:
        app.close()
        runner.close()
    assert not pool.loaded()  # in the worker's copy of the pool, never in the app's process
    assert runner.devices == ["cpu"]  # and training runs on the CPU, in a subprocess (no GPU there)
    assert {"evaluation", "heldout_losses", "run"} <= set(map(_name, zero_gpu_tasks()))


def _name(fn) -> str:
    return getattr(fn, "__name__", "")


def zero_gpu_tasks() -> list:
    from spaces.zero import decorator

    return [task for task, wrapped in decorator.decorated_cache.items() if task is not wrapped]


def test_the_train_form_starts_from_the_recipe_of_where_runs_train(monkeypatch):
    """A ZeroGPU Space trains on its CPU: the quick CPU recipe, not the 4-bit one of a GPU Space (T4 and up)."""
    from finetune.hardware import GPU, Machine
    from finetune.ui import train_tab

    zero = Machine(gpus=(GPU(0, "ZeroGPU", 70.0, (9, 0)),), zero_gpu=True)
    monkeypatch.setattr(train_tab, "machine", lambda: zero)
    assert train_tab.default_config().model.quantization is None
    monkeypatch.setattr(train_tab, "machine", lambda: Machine(gpus=(GPU(0, "Tesla T4", 15.0, (7, 5)),)))
    assert train_tab.default_config().model.quantization == "4bit"
