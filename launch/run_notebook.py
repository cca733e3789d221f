"""Executes a notebook headless, top to bottom as Colab's "Run all" would, and fails with the first failing cell.

    python launch/run_notebook.py launch/pipeline_demo.ipynb --workdir DIR [--flags "--config.x=y ..."]
        [--output executed.ipynb] [--timeout SECONDS] [--cwd DIR]

The kernel is this interpreter's ipykernel (nbclient), started in the repository root (or --cwd) with
ALIGN_JAX_DEMO_WORKDIR=DIR and ALIGN_JAX_PIPELINE_FLAGS=FLAGS in its environment, which the demo notebook
reads (its defaults: runs/demo and no flags). Each cell's text output is printed when the cell finishes.

Exit codes: 0 every cell ran; 1 a cell failed (its output and its error are printed); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _text(output: dict) -> str:
    """The readable text of one cell output (images as a placeholder)."""
    if output["output_type"] == "stream":
        return _ANSI.sub("", output["text"])
    if output["output_type"] == "error":
        return _ANSI.sub("", "\n".join(output["traceback"])) + "\n"
    data = output.get("data", {})
    for mime in data:
        if mime.startswith("image/"):
            return f"[{mime}]\n"
    for mime in ("text/markdown", "text/plain"):
        if mime in data:
            return data[mime] + "\n"
    return ""


def kernel_manager(kernel_dir: str):
    """A kernel manager whose python3 kernel is this interpreter (not whatever `python3` kernelspec the
    machine has registered), so the notebook sees this environment's packages."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = os.path.join(kernel_dir, "python3")
    os.makedirs(spec_dir, exist_ok=True)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        json.dump({"argv": argv, "display_name": "Python 3", "language": "python"}, f)
    specs = KernelSpecManager(kernel_dirs=[kernel_dir], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def execute(
    path: str,
    workdir: str,
    flags: str = "",
    *,
    cwd: str = ROOT,
    output: str | None = None,
    timeout: int = 3600,
    env: dict[str, str] | None = None,
    echo=print,
):
    """Runs every cell of the notebook at `path`; returns the executed notebook. Raises
    nbclient.exceptions.CellExecutionError (after `echo`ing the failing cell's output) when a cell fails.
    `output`: where to write the executed notebook (also when a cell fails)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    number = {i: n for n, i in enumerate((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), 1)}
    started: dict[int, float] = {}

    def on_execute(cell, cell_index):
        started[cell_index] = time.perf_counter()

    def on_executed(cell, cell_index, execute_reply):
        took = time.perf_counter() - started.get(cell_index, time.perf_counter())
        failed = execute_reply.get("content", {}).get("status") == "error"
        echo(f"--- cell {number[cell_index]}/{len(number)} ({cell.get('id', cell_index)}): {took:.1f} s")
        text = "".join(_text(o) for o in cell.get("outputs", []))
        if text and not failed:  # a failed cell's output comes with its error
            echo(text.rstrip("\n"))

    env = dict(os.environ if env is None else env)
    env.update(ALIGN_JAX_DEMO_WORKDIR=workdir, ALIGN_JAX_PIPELINE_FLAGS=flags)
    with tempfile.TemporaryDirectory(prefix="align_jax_kernel_") as kernel_dir:
        client = NotebookClient(
            nb,
            km=kernel_manager(kernel_dir),
            timeout=timeout,
            resources={"metadata": {"path": cwd}},
            on_cell_execute=on_execute,
            on_cell_executed=on_executed,  # after the cell's outputs are in, before a failure is raised
        )
        try:
            client.execute(env=env, cwd=cwd, cleanup_kc=True)  # shut the kernel down: we made its manager
        except CellExecutionError:
            echo("--- failed:")
            raise
        finally:
            if output:
                nbformat.write(nb, output)
    return nb


def _join_flags(argv: list[str]) -> list[str]:
    """`--flags "--config.x=y"` as `--flags=--config.x=y`: argparse takes a value that starts with "--" for an option."""
    argv = list(argv)
    if "--flags" in argv[:-1]:
        i = argv.index("--flags")
        argv[i : i + 2] = [f"--flags={argv[i + 1]}"]
    return argv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebook")
    p.add_argument("--workdir", required=True, help="the pipeline workdir (ALIGN_JAX_DEMO_WORKDIR)")
    p.add_argument("--flags", default="", help="extra pipeline flags (ALIGN_JAX_PIPELINE_FLAGS), one string")
    p.add_argument("--output", default=None, help="write the executed notebook here")
    p.add_argument("--timeout", type=int, default=3600, help="seconds any one cell may take")
    p.add_argument("--cwd", default=ROOT, help="the kernel's working directory (default: the repository root)")
    a = p.parse_args(_join_flags(sys.argv[1:] if argv is None else argv))
    if not os.path.isfile(a.notebook):
        p.error(f"no notebook at {a.notebook}")
    from nbclient.exceptions import CellExecutionError

    t0 = time.perf_counter()
    try:
        execute(
            os.path.abspath(a.notebook),
            os.path.abspath(a.workdir),
            a.flags,
            cwd=os.path.abspath(a.cwd),
            output=a.output,
            timeout=a.timeout,
            echo=lambda s: print(s, flush=True),
        )
    except CellExecutionError as e:
        print(_ANSI.sub("", str(e)), file=sys.stderr)
        print(f"error: {a.notebook}: a cell failed (above)", file=sys.stderr)
        return 1
    print(f"{a.notebook}: every cell ran ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
