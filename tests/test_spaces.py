from finetune import spaces


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
