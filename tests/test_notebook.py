"""The Colab notebook (launch/pipeline_demo.ipynb): its install cell's choices, the headless runner
(launch/run_notebook.py), and the whole notebook executed against a shrunk pipeline."""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
import tarfile
import zipfile

import nbformat
import pytest

from tests.test_configs import load_preset
from tests.test_pipeline import tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "pipeline_demo.ipynb")
RUNNER = os.path.join(ROOT, "launch", "run_notebook.py")


def cell(cell_id: str) -> str:
    return next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.get("id") == cell_id)


@pytest.fixture
def install_cell():
    """The install cell's functions: its source executed under another name than __main__, which defines
    them and installs nothing."""
    ns = {"__name__": "install_cell"}
    exec(compile(cell("install"), "install-cell", "exec"), ns)
    return ns


def write(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def pyproject(version="1.2.3", name="align_jax"):
    return f'[project]\nname = "{name}"\nversion = "{version}"\ndependencies = [\n    "jax>=0.6,<0.11",\n]\n'


def project(root, version="1.2.3", name="align_jax"):
    """A stand-in for the repository: pyproject.toml and the two files the notebook runs."""
    write(os.path.join(root, "pyproject.toml"), pyproject(version, name))
    write(os.path.join(root, "launch", "train.py"))
    write(os.path.join(root, "configs", "pipeline.py"))
    return str(root)


def sdist(path, version, files):
    top = f"align_jax-{version}"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def wheel(path, requires=("jax<0.11,>=0.6", 'jax[cuda12]<0.11,>=0.6; extra == "cuda"')):
    version = os.path.basename(path).split("-")[1]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("align_jax/__init__.py", "")
        meta = [f"Name: align_jax\nVersion: {version}\n", *[f"Requires-Dist: {r}\n" for r in requires]]
        z.writestr(f"align_jax-{version}.dist-info/METADATA", "Metadata-Version: 2.1\n" + "".join(meta))
    return str(path)


# --- where the install cell takes align_jax from ---


def test_a_checkout_wins_over_uploads_and_the_repo(install_cell, tmp_path):
    find = install_cell["find_source"]
    root = project(tmp_path / "checkout")
    below = tmp_path / "checkout" / "launch"
    wheel(tmp_path / "checkout" / "launch" / "align_jax-0.1.0-py3-none-any.whl")
    assert find(str(below), "https://example.invalid/align_jax.git") == ("checkout", root)
    assert find(root, "") == ("checkout", root)
    # Another project's pyproject.toml is not a checkout.
    other = project(tmp_path / "other", name="not_align_jax")
    with pytest.raises(install_cell["SourceNotFound"]):
        find(other, "")


def test_an_upload_then_the_repo_then_a_clear_error(install_cell, tmp_path):
    find, missing = install_cell["find_source"], install_cell["SourceNotFound"]
    content = tmp_path / "content"
    content.mkdir()
    url = "https://example.invalid/align_jax.git"
    assert find(str(content), url) == ("repo", url)
    whl = wheel(content / "align_jax-0.1.0-py3-none-any.whl")
    assert find(str(content), url) == ("wheel", whl)
    tgz = sdist(content / "align_jax-0.1.0.tar.gz", "0.1.0", {"pyproject.toml": pyproject("0.1.0")})
    assert find(str(content), url) == ("sdist", tgz)  # an sdist carries launch/ and configs/; a wheel does not

    with pytest.raises(missing) as e:
        find(str(tmp_path / "empty"), "")
    message = str(e.value)
    for way in ("inside a checkout", "align_jax-*.tar.gz", "align_jax-*.whl", "set REPO", "ALIGN_JAX_REPO"):
        assert way in message, way


def test_an_sdist_is_unpacked_and_must_carry_launch_and_configs(install_cell, tmp_path):
    prepare, missing = install_cell["prepare"], install_cell["SourceNotFound"]
    files = {"pyproject.toml": pyproject("1.2.3"), "launch/train.py": "", "configs/pipeline.py": ""}
    tgz = sdist(tmp_path / "align_jax-1.2.3.tar.gz", "1.2.3", files)
    tree = str(tmp_path / "align_jax-1.2.3")
    assert prepare("sdist", tgz, str(tmp_path)) == (tree, tree, "1.2.3")
    assert os.path.isfile(os.path.join(tree, "configs", "pipeline.py"))
    assert prepare("sdist", tgz, str(tmp_path)) == (tree, tree, "1.2.3")  # a rerun uses what was unpacked

    (tmp_path / "bare").mkdir()
    bare = sdist(tmp_path / "bare" / "align_jax-1.2.4.tar.gz", "1.2.4", {"pyproject.toml": pyproject("1.2.4")})
    with pytest.raises(missing, match=r"lacks launch/train.py, configs/pipeline.py: this sdist was built without"):
        prepare("sdist", bare, str(tmp_path / "bare"))


def test_a_wheel_needs_launch_and_configs_beside_it(install_cell, tmp_path):
    prepare, missing = install_cell["prepare"], install_cell["SourceNotFound"]
    whl = wheel(tmp_path / "align_jax-2.0.1-py3-none-any.whl")
    with pytest.raises(missing, match="a wheel holds only the align_jax package"):
        prepare("wheel", whl, str(tmp_path))
    write(tmp_path / "launch" / "train.py")
    write(tmp_path / "configs" / "pipeline.py")
    assert prepare("wheel", whl, str(tmp_path)) == (str(tmp_path), whl, "2.0.1")


def test_the_repo_is_cloned_once(install_cell, tmp_path, capsys):
    prepare = install_cell["prepare"]
    src = project(tmp_path / "src" / "align_jax", version="3.0.0")
    git = ["git", "-C", src, "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", src], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    url = "file://" + src
    content = tmp_path / "content"
    content.mkdir()
    tree = str(content / "align_jax")
    assert prepare("repo", url, str(content)) == (tree, tree, "3.0.0")
    assert os.path.isfile(os.path.join(tree, "launch", "train.py"))
    assert prepare("repo", url, str(content)) == (tree, tree, "3.0.0")
    assert "using the earlier clone" in capsys.readouterr().out

    not_ours = project(tmp_path / "other", name="something_else")
    subprocess.run(["git", "init", "-q", not_ours], check=True)
    with pytest.raises(install_cell["SourceNotFound"], match="is not the align_jax project"):
        prepare("repo", not_ours, str(content))


# --- which jax it installs ---


def fake_nvidia_smi(path, rc, out):
    write(path, f"#!/bin/sh\necho '{out}'\nexit {rc}\n")
    os.chmod(path, 0o755)
    return str(path)


def test_the_accelerator_is_found_without_jax(install_cell, tmp_path):
    detect = install_cell["detect_accelerator"]
    dev = tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    write(dev / "vfio" / "vfio")  # the VFIO driver alone: no device
    none = str(tmp_path / "no-nvidia-smi")
    assert detect({}, str(dev), none) == "cpu"
    assert detect({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, str(dev), none) == "tpu"
    assert detect({"TPU_NAME": "local"}, str(dev), none) == "tpu"
    gpu = fake_nvidia_smi(tmp_path / "smi-gpu", 0, "GPU 0: Tesla T4 (UUID: GPU-1234)")
    assert detect({}, str(dev), gpu) == "cuda"
    no_driver = fake_nvidia_smi(tmp_path / "smi-broken", 9, "NVIDIA-SMI has failed: no driver")
    assert detect({}, str(dev), no_driver) == "cpu"
    write(dev / "vfio" / "0")  # a TPU v5e/v6e host's VFIO group
    assert detect({}, str(dev), none) == "tpu"
    write(dev / "accel0")  # older TPU hosts
    assert detect({}, str(tmp_path / "dev"), none) == "tpu"


def jax_version() -> str:
    return importlib.metadata.version("jax")


def test_the_jax_range_is_the_projects(install_cell, tmp_path):
    from packaging.specifiers import SpecifierSet

    jax_range = install_cell["jax_range"]
    ours = jax_range("checkout", ROOT)
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert f'"jax{ours}"' in f.read().replace(" ", "")
    assert SpecifierSet(ours).contains(jax_version())  # the jax this suite runs on
    whl = wheel(tmp_path / "align_jax-0.1.0-py3-none-any.whl", requires=("numpy>=1", "jax<0.12,>=0.7"))
    assert SpecifierSet(jax_range("wheel", whl)) == SpecifierSet(">=0.7,<0.12")


def test_install_picks_the_extra_and_keeps_the_runtimes_jax_in_range(install_cell, capsys):
    calls = []

    def pip(*cmd):  # records the pip command and its constraints file; installs nothing
        cmd = [str(c) for c in cmd]
        pins = None
        if "-c" in cmd:
            with open(cmd[cmd.index("-c") + 1]) as f:
                pins = f.read()
        calls.append((cmd, pins))

    install_cell["run"] = pip
    install, jax = install_cell["install"], jax_version()

    install("checkout", "/x/align_jax", "cuda", f">={jax}")
    cmd, pins = calls.pop()
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert cmd[cmd.index("-e") + 1] == "/x/align_jax[cuda]"
    assert f"jax=={jax}\n" in pins  # the runtime's jax, kept
    assert not os.path.exists(cmd[cmd.index("-c") + 1])  # the constraints file is removed afterwards
    out = capsys.readouterr().out
    assert "accelerator: cuda" in out and f"the runtime's jax {jax} is within" in out

    install("wheel", "/up/align_jax-0.1.0-py3-none-any.whl", "tpu", ">=99")
    cmd, pins = calls.pop()
    assert "/up/align_jax-0.1.0-py3-none-any.whl[tpu]" in cmd and "-e" not in cmd and pins is None
    assert "outside align_jax's range jax>=99: pip replaces it" in capsys.readouterr().out

    install("sdist", "/c/align_jax-0.1.0", "cpu", ">=0.1")
    cmd, _ = calls.pop()
    assert cmd[cmd.index("-e") + 1] == "/c/align_jax-0.1.0"  # no extra on a CPU runtime


def run_install_cell(monkeypatch):
    """Executes the whole install cell as the notebook would, with subprocesses forbidden."""

    def no_subprocess(*a, **k):
        raise AssertionError(f"the install cell started a process: {a}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(compile(cell("install"), "install-cell", "exec"), {"__name__": "__main__"})


def test_the_cell_in_an_empty_directory_names_the_three_ways(monkeypatch, tmp_path):
    monkeypatch.delenv("ALIGN_JAX_REPO", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="Either run this notebook inside a checkout"):
        run_install_cell(monkeypatch)


def test_the_cell_in_this_checkout_installs_nothing_and_moves_to_its_root(monkeypatch, capsys):
    monkeypatch.chdir(os.path.join(ROOT, "launch"))
    run_install_cell(monkeypatch)  # align_jax of this version is installed: no pip
    assert os.getcwd() == ROOT
    out = capsys.readouterr().out
    assert "already installed: skipping pip" in out and f"project directory: {ROOT}" in out


# --- the headless runner ---


def fresh_runtime_env() -> dict[str, str]:
    """This environment less the test suite's 8 fake devices: a notebook runtime has one CPU device."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env["XLA_FLAGS"] = flags
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_notebook(path, workdir, flags, output, timeout=900):
    cmd = [sys.executable, RUNNER, str(path), "--workdir", str(workdir), "--flags", flags, "--output", str(output)]
    return subprocess.run(cmd, capture_output=True, text=True, env=fresh_runtime_env(), timeout=timeout, cwd=ROOT)


def test_the_runner_passes_the_settings_and_fails_with_the_failing_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            'import os\nprint(os.environ["ALIGN_JAX_DEMO_WORKDIR"], os.environ["ALIGN_JAX_PIPELINE_FLAGS"], os.getcwd())'
        ),
        nbformat.v4.new_code_cell('raise ValueError("cell two fails")'),
        nbformat.v4.new_code_cell('print("never")'),
    ]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    r = run_notebook(tmp_path / "nb.ipynb", tmp_path / "w", "--config.a=1 --config.b=x", tmp_path / "out.ipynb", 120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{tmp_path / 'w'} --config.a=1 --config.b=x {ROOT}" in r.stdout  # env and cwd as documented
    assert "ValueError: cell two fails" in r.stderr and "a cell failed" in r.stderr
    done = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert done.cells[1].outputs[0].output_type == "error" and not done.cells[2].outputs


# --- the notebook itself, on a shrunk pipeline ---


def shrunk_flags() -> str:
    """tests/test_pipeline.py's shrunk pipeline as command-line flags (every key it changes in the preset),
    less GRPO, DPO and the reward model: the notebook needs a report, a merge and a PAS model, and the
    pipeline's own tests cover the rest (CI runs the notebook on the whole tiny pipeline too)."""

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    preset, small = dict(leaves(load_preset("pipeline", "tiny").to_dict())), dict(leaves(tiny_pipeline().to_dict()))
    assert set(small) == set(preset)
    flags = [f"--config.{k}={v}" for k, v in small.items() if v != preset[k]]
    flags += ["--config.stages=sft,pas,merge,eval", "--config.merge.method=linear"]
    flags += ["--config.merge.models=stage:sft,stage:pas", "--config.eval.models=base,sft,merge"]
    return " ".join([*flags, "--config.eval.rm=", "--config.eval.reference="])  # no RM: no reward, no win rate


def outputs(nb, cell_id) -> str:
    c = next(c for c in nb.cells if c.get("id") == cell_id)
    return "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in c.outputs)


@pytest.mark.slow
def test_the_notebook_runs_headless_on_a_fresh_workdir(tmp_path):
    """Every cell, as on a fresh runtime: the pipeline cell trains (~1 min), the report shows, the export
    replaces an earlier one, and the exported policy and the PAS model answer."""
    work = tmp_path / "demo"
    old = tmp_path / "demo-hf"  # an earlier export where the export cell writes: --overwrite replaces it
    write(old / "config.json", "{}")
    write(old / "model.safetensors", "old")

    r = run_notebook(NOTEBOOK, work, shrunk_flags(), tmp_path / "executed.ipynb")
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    nb = nbformat.read(tmp_path / "executed.ipynb", as_version=4)

    assert "already installed: skipping pip" in outputs(nb, "install")
    ran = outputs(nb, "pipeline")
    for stage in ("sft", "pas"):
        assert f"running {stage} in {work}/{stage}" in ran, ran[-3000:]
    report = next(c for c in nb.cells if c.get("id") == "report")
    assert "| metric | base | sft | merge |" in outputs(nb, "report")
    assert sum("image/png" in o.get("data", {}) for o in report.outputs) >= 3  # training curves, metric plots
    assert f"{old}\n" in outputs(nb, "export")
    assert {"model.safetensors", "tokenizer.json"} <= set(os.listdir(old))
    assert os.path.getsize(old / "model.safetensors") > 1000
    assert "What is 12 plus 30?\n-> " in outputs(nb, "chat")
    assert "What is 7 times 8?" in outputs(nb, "augment")
