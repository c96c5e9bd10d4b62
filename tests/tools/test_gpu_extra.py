"""tools/check_gpu_extra.py: `pip install .[gpu]` must resolve against the core pins on a GPU
machine, judged from the packages' published metadata by pip's own resolver (dry run, wheels
only, nothing installed or built). The two network tests ask the package registry; the others
check the parsing of pip's messages on text pip printed for real."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "check_gpu_extra.py"
sys.path.insert(0, str(ROOT / "tools"))
import check_gpu_extra as cge  # noqa: E402


def run_tool(*args: str, timeout: float = 900) -> tuple[int, str]:
    r = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.slow
def test_the_gpu_extra_resolves_against_the_core_pins():
    """The project's own extra, as setup.py declares it (about 2 minutes: two resolver passes over
    some 230 packages, the second with a stand-in for Transformer Engine's source-only torch part)."""
    rc, out = run_tool()
    assert rc == 0, out
    assert "OK: resolves to" in out, out
    for pinned in ("torch 2.13.0", "vllm 0.32.0", "megatron-core 0.16.1", "transformer-engine 2.11.0"):
        assert pinned in out, out
    # Transformer Engine's PyTorch part is published as a source distribution only: named, not hidden
    assert "NOTE: transformer-engine-torch 2.11.0 publishes only a source distribution" in out, out
    assert "cannot be read without building it" in out, out


def test_a_pin_conflict_fails_and_names_the_packages():
    """vllm 0.33.0 requires torch 2.14.0: against the core's torch==2.13.0 the check must fail
    (exit 1, not 2: a conflict, not a broken check) and say which packages conflict."""
    rc, out = run_tool("--requirement", "torch==2.13.0", "--requirement", "vllm==0.33.0", timeout=300)
    assert rc == 1, out
    assert "FAIL: the requirements do not resolve together" in out, out
    assert "vllm 0.33.0 depends on torch==2.14.0" in out and "The user requested torch==2.13.0" in out, out


def test_the_extra_is_read_from_setup_py():
    reqs = cge.project_requirements("gpu")
    assert "torch==2.13.0" in reqs  # the core pins come along
    assert any(r.startswith("vllm") for r in reqs) and any(r.startswith("transformer-engine") for r in reqs)
    with pytest.raises(cge.CheckError, match="no extra 'nope'"):
        cge.project_requirements("nope")


# pip 26.3's output on `transformer-engine[core_cu13,pytorch]>=2.10,<2.12 torch==2.13.0` (stdout part)
PIP_TE_OUTPUT = """\
INFO: pip is still looking at multiple versions of transformer-engine[core-cu13,pytorch] to determine which version is compatible with other requirements. This could take a while.

The conflict is caused by:
    The user requested transformer-engine<2.12 and >=2.10
    transformer-engine[core-cu13,pytorch] 2.11.0 depends on transformer-engine 2.11.0 (from https://files.pythonhosted.org/packages/00/33/x/transformer_engine-2.11.0-py3-none-any.whl (from https://pypi.org/simple/transformer-engine/) (requires-python:>=3.10.0))
    transformer-engine[core-cu13,pytorch] 2.10.0 depends on transformer_engine_torch==2.10.0; extra == "pytorch"

Additionally, some packages in these conflicts have no matching distributions available for your environment:
    transformer-engine
    transformer-engine-torch

To fix this you could try to:
1. loosen the range of package versions you've specified
"""

PIP_NOT_FOUND = """\
ERROR: Could not find a version that satisfies the requirement llguidance<1.8.0,>=1.7.0 (from vllm) (from versions: 1.6.0, 1.6.1)
ERROR: No matching distribution found for llguidance<1.8.0,>=1.7.0 (from vllm)
"""


def test_names_pip_could_not_find_are_read_from_its_messages():
    assert cge.unavailable_names(PIP_TE_OUTPUT) == {"transformer-engine", "transformer-engine-torch"}
    assert cge.unavailable_names(PIP_NOT_FOUND) == {"llguidance"}
    assert cge.unavailable_names("Would install torch-2.13.0") == set()


def test_the_versions_asked_for_are_read_from_pip_and_the_requirements():
    assert cge.wanted_specifiers("transformer-engine-torch", PIP_TE_OUTPUT, []) == ["==2.10.0"]
    assert cge.wanted_specifiers("llguidance", PIP_NOT_FOUND, []) == ["<1.8.0,>=1.7.0", "<1.8.0,>=1.7.0"]
    assert cge.wanted_specifiers("foo-bar", "", ["Foo_Bar[x]>=1,<2", "torch==2.13.0"]) == ["<2,>=1"]


def test_the_conflict_explanation_keeps_the_lines_that_name_packages():
    text = cge.conflict_text(PIP_TE_OUTPUT + "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io\n")
    assert "transformer-engine[core-cu13,pytorch] 2.10.0 depends on transformer_engine_torch==2.10.0" in text
    assert "The user requested transformer-engine<2.12 and >=2.10" in text
    assert "ERROR: ResolutionImpossible" in text
    assert "This could take a while" not in text and "loosen the range" not in text


def test_a_stand_in_wheel_carries_the_metadata(tmp_path):
    import zipfile

    whl = cge.write_stand_in(tmp_path, "transformer-engine-torch", "2.11.0", ["torch>=2.1"], ">=3.10")
    assert whl.name == "transformer_engine_torch-2.11.0-py3-none-any.whl"
    with zipfile.ZipFile(whl) as z:
        meta = z.read("transformer_engine_torch-2.11.0.dist-info/METADATA").decode()
    assert "Name: transformer-engine-torch\nVersion: 2.11.0\n" in meta
    assert "Requires-Python: >=3.10\n" in meta and "Requires-Dist: torch>=2.1\n" in meta
