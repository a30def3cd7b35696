"""Every module of the package can be smoke-run alone: `python -m hf_vla.<module>` demonstrates it on tiny offline
objects, and a command-line module answers `--help`.

The runs share one child process (this file run as a script, each module through `runpy` as `__main__`), so the suite
pays for one interpreter start and no smoke run changes the test process's registries, threads or working directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "hf_vla"
# command-line modules: their smoke run is argument parsing; two modules write where they are told to
ARGUMENTS = {
    "hf_vla.cli": ["--help"],
    "hf_vla.hub.convert_starvla": ["--help"],
    "hf_vla.serving.server": ["--help"],
    "hf_vla.sim.evaluation": ["--help"],
    "hf_vla.sim.metaworld": ["--help"],
    "hf_vla.data.lerobot_writer": ["{tmp}/dataset"],
    "hf_vla.testing": ["{tmp}/tiny_vlm"],
}


def package_modules() -> list[str]:
    paths = sorted(p for p in PACKAGE_ROOT.rglob("*.py") if p.name != "__init__.py")
    return ["hf_vla." + ".".join(p.relative_to(PACKAGE_ROOT).with_suffix("").parts) for p in paths]


def module_path(module: str) -> Path:
    return PACKAGE_ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")


def command_line_modules() -> list[str]:
    """Modules whose smoke run reads command-line arguments."""
    return [m for m in package_modules() if any(s in module_path(m).read_text() for s in ("sys.argv", "ArgumentParser("))]


@pytest.mark.parametrize("module", package_modules())
def test_module_has_a_smoke_run(module):
    assert 'if __name__ == "__main__":' in module_path(module).read_text(), f"{module} has no smoke run"


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SMOKE_TMP": str(tmp)}
    runs = [*package_modules(), *(f"{m} --help" for m in command_line_modules())]
    result = subprocess.run([sys.executable, __file__, *runs], capture_output=True, text=True, env=env, cwd=tmp,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return {**json.loads(result.stdout.splitlines()[-1]), "files_left_in_cwd": sorted(os.listdir(tmp))}


@pytest.mark.parametrize("module", command_line_modules())
def test_command_line_module_answers_help(smoke_runs, module):
    run = smoke_runs[f"{module} --help"]
    assert run["error"] is None and "usage:" in run["output"], f"{module} --help:\n{run['error']}\n{run['output']}"
    assert "--help" not in smoke_runs["files_left_in_cwd"]  # not taken for an output path


@pytest.mark.parametrize("module", package_modules())
def test_smoke_run_succeeds_and_reports(smoke_runs, module):
    run = smoke_runs[module]
    assert run["error"] is None, f"{module}:\n{run['error']}\n{run['output'][-2000:]}"
    assert run["output"].strip(), f"{module} printed nothing"


def _run_all(modules: list[str]) -> dict:
    import contextlib
    import io
    import runpy
    import traceback
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")  # "found in sys.modules": expected
    tmp = os.environ.get("SMOKE_TMP", ".")
    results = {}
    for run in modules:
        module, _, help_flag = run.partition(" ")
        output = io.StringIO()
        error = None
        arguments = [help_flag] if help_flag else [arg.format(tmp=tmp) for arg in ARGUMENTS.get(module, [])]
        argv = [module, *arguments]
        sys.argv = argv
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            if exit_.code not in (None, 0):
                error = f"exit status {exit_.code}"
        except BaseException:  # noqa: BLE001 (the report carries it to the test)
            error = traceback.format_exc()
        results[run] = {"output": output.getvalue(), "error": error}
    return results


if __name__ == "__main__":
    report = _run_all(sys.argv[1:])
    print(json.dumps(report))
