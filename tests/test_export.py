"""launch/export.py never loses a user's work: it writes only to a new or empty directory apart from its
workdir, replaces a previous export only with --overwrite, leaves normal permissions, and clears the
scratch directories that killed exports leave behind."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

import align_jax as aj
from align_jax import checkpoint, outdir
from align_jax.models import hf, safetensors_io
from align_jax.models.hf import abstract_params
from align_jax.stages import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
from export import export, main  # noqa: E402

CFG = aj.ModelConfig(
    vocab_size=272, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    dtype="float32", eos_token_id=2, pad_token_id=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A stage workdir as training leaves it: checkpoints/, metrics.jsonl and tokenizer/."""
    from align_jax.data.bpe import train_tokenizer

    path = tmp_path_factory.mktemp("export_source") / "run"
    r = np.random.default_rng(0)
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(CFG)))
    params = {k: (0.05 * r.standard_normal(x.shape)).astype(np.float32) for k, x in flat.items()}
    ckpt = checkpoint.Checkpointer(str(path), async_save=False)
    config = ml_collections.ConfigDict({"stage": "sft"})
    ckpt.save(3, {"params": traverse_util.unflatten_dict(params)}, {}, build.saved_config(config, CFG))
    ckpt.close()
    tok = train_tokenizer(["What is two plus two? It is four.", "hello world"], vocab_size=CFG.vocab_size)
    tok.save_pretrained(os.path.join(path, build.TOKENIZER_DIR))
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    return str(path)


@pytest.fixture
def workdir(source, tmp_path):
    return shutil.copytree(source, tmp_path / "runs" / "a")


def snapshot(path) -> dict:
    """Every file under `path` with its content hash: equal snapshots mean nothing was touched."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def assert_loads(out):
    cfg, params = aj.load_pretrained(out)
    assert cfg.hidden_size == CFG.hidden_size and params["embed"]["embedding"].shape[0] == CFG.vocab_size
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


# --- the user's reports -------------------------------------------------------------------------------


def test_out_equal_to_the_workdir_is_refused_and_the_workdir_untouched(workdir):
    before = snapshot(workdir)
    assert {"checkpoints", "metrics.jsonl", "tokenizer"} <= set(before)
    with pytest.raises(ValueError, match=r"export target .*runs/a is the workdir .*runs/a; write the export outside"):
        export(str(workdir), str(workdir))
    # The same directory through a symlink, or spelled with a trailing slash, is still the workdir.
    link = workdir.parent / "link"
    os.symlink(workdir, link)
    with pytest.raises(ValueError, match="is the workdir"):
        export(str(workdir), str(link) + "/")
    assert snapshot(workdir) == before


def test_out_a_parent_folder_of_runs_is_refused_and_nothing_touched(workdir, tmp_path):
    runs = workdir.parent
    shutil.copytree(workdir, runs / "b")  # a sibling run
    (runs / "notes.txt").write_text("my notes")
    before = snapshot(runs)
    with pytest.raises(ValueError, match=r"export target .*runs contains the workdir"):
        export(str(workdir), str(runs))
    # A folder of runs the workdir is not in is no export either, with or without overwrite.
    elsewhere = shutil.move(tmp_path / "runs" / "a", tmp_path / "a")
    before = snapshot(runs)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"runs holds b/, notes.txt: not a Hugging Face export"):
            export(str(elsewhere), str(runs), overwrite=overwrite)
    assert snapshot(runs) == before


def test_out_inside_the_workdir_is_refused(workdir):
    before = snapshot(workdir)
    with pytest.raises(
        ValueError, match=r"export target .*runs/a/hf is inside the workdir .*runs/a;.*e\.g\. .*runs/a-hf"
    ):
        export(str(workdir), str(workdir / "hf"))
    assert snapshot(workdir) == before and not os.path.exists(workdir / "hf")


def test_a_previous_export_is_replaced_only_with_overwrite(workdir, tmp_path):
    out = str(tmp_path / "hf")
    assert export(str(workdir), out) == out
    before = snapshot(out)
    with pytest.raises(
        FileExistsError,
        match=r"hf holds a previous Hugging Face export \(.*config.json.*\)\. Pass overwrite=True \(--overwrite\)",
    ):
        export(str(workdir), out, dtype="bfloat16")
    assert snapshot(out) == before
    export(str(workdir), out, dtype="bfloat16", overwrite=True)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    assert_loads(out)
    assert sorted(os.listdir(tmp_path)) == ["hf", "runs"]  # no scratch directory left beside it


def test_a_non_export_is_refused_even_with_overwrite(workdir, tmp_path):
    # Looks like an export at the top, but holds a folder: HF model directories are flat.
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x")
    (out / "checkpoints").mkdir()
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"holds checkpoints/, config.json, model.safetensors: not a Hugging"):
        export(str(workdir), str(out), overwrite=True)
    # A user's file, and a file in place of the directory.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"notes holds todo.txt: not a Hugging Face export"):
        export(str(workdir), str(tmp_path / "notes"), overwrite=True)
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        export(str(workdir), str(tmp_path / "notes" / "todo.txt"), overwrite=True)
    assert snapshot(out) == before and (tmp_path / "notes" / "todo.txt").read_text() == "x"


def test_written_directory_and_files_have_normal_permissions(workdir, tmp_path):
    old = os.umask(0o022)
    try:
        out = export(str(workdir), str(tmp_path / "new" / "hf"))
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    modes = {f: os.stat(os.path.join(out, f)).st_mode & 0o777 for f in os.listdir(out)}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_leftovers_of_killed_exports_are_removed_live_ones_kept(workdir, tmp_path, monkeypatch, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead_tmp": f".hf.tmp-{dead.pid}-{outdir.HOST}-0123abcd",
        "dead_old": f".hf.old-{dead.pid}-{outdir.HOST}-89abcdef",
        "live": f".hf.tmp-{os.getpid()}-{outdir.HOST}-deadbeef",  # a concurrent export, still running
        "other_host": f".hf.tmp-{dead.pid}-elsewhere-00000000",  # its pid means nothing here
        "other_name": f".hf2.tmp-{dead.pid}-{outdir.HOST}-00000000",  # another export's
    }
    for name in names.values():
        os.mkdir(tmp_path / name)
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 3_000_000)

    seen = []
    write = safetensors_io.write

    def spy(path, tensors, *a, **k):  # the scratch directory names this process
        seen.append(os.path.basename(os.path.dirname(path)))
        return write(path, tensors, *a, **k)

    monkeypatch.setattr(safetensors_io, "write", spy)
    with caplog.at_level(logging.WARNING, logger="align_jax.outdir"):
        export(str(workdir), str(tmp_path / "hf"))
    assert seen and seen[0].startswith(f".hf.tmp-{os.getpid()}-{outdir.HOST}-")
    left = set(os.listdir(tmp_path))
    assert not {names["dead_tmp"], names["dead_old"]} & left
    assert {names["live"], names["other_host"], names["other_name"], "hf"} <= left
    log = caplog.text
    assert f"removed {tmp_path / names['dead_tmp']} (3.0 MB), left by an interrupted writer (pid {dead.pid}" in log
    assert f"removed {tmp_path / names['dead_old']} (3.0 MB)" in log
    assert f"{names['other_host']} (3.0 MB) is from a writer on host elsewhere" in log
    assert names["live"] not in log


def test_an_empty_existing_directory_is_written_into(workdir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    assert export(str(workdir), str(out)) == str(out)
    assert_loads(str(out))


def test_a_sharded_export_is_recognised_and_replaced_with_overwrite(tmp_path):
    params = aj.init_params(CFG, jax.random.key(0))
    out = hf.save_pretrained(CFG, params, tmp_path / "hf", max_shard_bytes=20_000)
    assert hf.INDEX_FILE in os.listdir(out)
    with pytest.raises(FileExistsError, match="previous Hugging Face export"):
        hf.save_pretrained(CFG, params, out)
    hf.save_pretrained(CFG, params, out, overwrite=True)  # now one file: the old shards go with the old export
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]
    # A shard missing from the index: not an export this code wrote, so not replaced.
    hf.save_pretrained(CFG, params, tmp_path / "sharded", max_shard_bytes=20_000)
    shard = next(f for f in os.listdir(tmp_path / "sharded") if f.startswith("model-00001-of-"))
    os.remove(tmp_path / "sharded" / shard)
    with pytest.raises(FileExistsError, match="not a Hugging Face export"):
        hf.check_export_target(tmp_path / "sharded", overwrite=True)


# --- the command line -----------------------------------------------------------------------------


def test_cli_refusal_exits_2_with_one_line(workdir):
    before = snapshot(workdir)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "export.py"), "--workdir", str(workdir), "--out", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: export target {workdir} is the workdir {workdir}; write the export outside it, e.g. {workdir}-hf"
    ]
    assert "Traceback" not in r.stderr
    assert snapshot(workdir) == before


def test_cli_success_is_quiet(workdir, tmp_path):
    # Before: ~40 lines of Orbax INFO per restore, "Unable to initialize backend 'tpu'" and "PyTorch was not
    # found" ahead of the result. Now the library logs stay at WARNING unless --verbose.
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch", "export.py"),
        "--workdir",
        str(workdir),
        "--out",
        str(tmp_path / "hf"),
    ]
    before = snapshot(workdir)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS=""))
    assert snapshot(workdir) == before  # reading a workdir writes nothing into it
    assert r.returncode == 0 and r.stdout == f"{tmp_path / 'hf'}\n", r.stderr[-2000:]
    assert r.stderr.strip() == "", r.stderr[-2000:]
    r = subprocess.run([*cmd, "--overwrite", "--verbose"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "checkpoint" in r.stderr.lower()  # --verbose brings the library logs back


def test_cli_prints_the_directory_and_overwrites_on_request(workdir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "hf")
    argv = ["export.py", "--workdir", str(workdir), "--out", out]
    monkeypatch.setattr(sys, "argv", argv)
    assert main() == 0 and capsys.readouterr().out == out + "\n"
    assert main() == 2 and "Pass overwrite=True (--overwrite) to replace it" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", [*argv, "--overwrite"])
    assert main() == 0 and capsys.readouterr().out == out + "\n"


def test_a_mistyped_workdir_is_an_error_and_creates_nothing(tmp_path, capsys, monkeypatch):
    # Before: a hub error ("Repo id must be in the form ...") and <typo>/checkpoints created as a side effect.
    typo = tmp_path / "runs" / "mergd"
    monkeypatch.setattr(sys, "argv", ["export.py", "--workdir", str(typo), "--out", str(tmp_path / "hf")])
    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: workdir={typo}: expected an align_jax stage workdir") and "no such directory" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "hf").exists()
