"""The wheel ships the CUDA sources and the reference inside the package, and works installed.

Builds the wheel with ``pip wheel`` (hatchling, fetched into pip's isolated build environment
unless it is already importable), checks its file list, installs it with ``--no-deps`` into a
fresh venv outside the repository and runs ssmkit from there on NumPy inputs (the CPU path).
The venv sees this interpreter's site-packages through a ``.pth`` file, for NumPy and friends;
the editable install of the checkout is not visible there (its ``.pth`` is not processed).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    cmd = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(out), "-q"]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.append("--no-build-isolation")     # hatchling is here: no need to fetch it
    _run(cmd, cwd=str(out))
    wheels = list(out.glob("ssmkit-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expect = {f"ssmkit/kernels_cu/{p.name}" for p in (REPO / "kernels_cu").iterdir()
              if p.suffix in (".cu", ".cuh")}
    expect |= {f"ssmkit/reference/{p.name}" for p in (REPO / "reference").glob("*.py")}
    expect |= {f"ssmkit/{p.relative_to(REPO / 'ssmkit').as_posix()}" for p in (REPO / "ssmkit").rglob("*.py")}
    assert any(n.endswith(".cu") for n in expect) and any(n.endswith(".cuh") for n in expect)
    assert "ssmkit/reference/__init__.py" in expect
    missing = sorted(expect - names)
    assert not missing, f"missing from the wheel: {missing}"
    assert not any(n.startswith(("kernels_cu/", "reference/", "tests/", "benchmarks/")) for n in names)
    dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    meta = zipfile.ZipFile(wheel).read(f"{dist}/METADATA").decode()
    assert "Requires-Python: >=3.10" in meta
    assert "Requires-Dist: numpy" in meta
    assert "Provides-Extra: test" in meta and "Provides-Extra: torch" in meta
    # CuPy only through the extra of the driver's CUDA major version, never by default.
    for extra, wheel_name in (("cuda13", "cupy-cuda13x"), ("cuda12", "cupy-cuda12x")):
        assert f"Provides-Extra: {extra}" in meta
        cupy_lines = [ln for ln in meta.splitlines() if ln.startswith(f"Requires-Dist: {wheel_name}")]
        assert cupy_lines and all(f"extra == '{extra}'" in ln.replace('"', "'") for ln in cupy_lines), cupy_lines
    entry = zipfile.ZipFile(wheel).read(f"{dist}/entry_points.txt").decode()
    assert "ssmkit-demo = ssmkit.demo:main" in entry
    assert "ssmkit = ssmkit.cli:main" in entry


_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np
    import ssmkit, ssmkit.reference
    from ssmkit._layout import kernels_dir
    from ssmkit._compile import compile_options, sources_hash
    rng = np.random.default_rng(0)
    Bn, Dn, L, N = 2, 4, 33, 3
    u = rng.standard_normal((Bn, Dn, L)); delta = rng.uniform(0.1, 1.0, (Bn, Dn, L))
    A = -rng.uniform(0.5, 2.0, (Dn, N)); Bv = rng.standard_normal((Bn, N, L)); Cv = rng.standard_normal((Bn, N, L))
    out = ssmkit.selective_scan(u, delta, A, Bv, Cv, D=rng.standard_normal(Dn), delta_softplus=True)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (Bn, Dn, L) and np.all(np.isfinite(out))
    print(json.dumps({"ssmkit": ssmkit.__file__, "reference": ssmkit.reference.__file__,
                      "kernels_dir": str(kernels_dir()), "hash": sources_hash(),
                      "include": [o for o in compile_options() if o.startswith("-I")]}))
""")


def test_installed_wheel_works_outside_the_repo(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # NumPy (and the rest of this environment) without reinstalling it; appended after the
    # venv's own site-packages, so the installed wheel wins over anything found there.
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_parent_env.pth").write_text("\n".join(sorted(parent)) + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "-q", wheel])

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    info = json.loads(_run([py, "-c", _CHECK], cwd=str(work), env=env).stdout.strip().splitlines()[-1])
    for key in ("ssmkit", "reference", "kernels_dir"):
        assert Path(info[key]).resolve().is_relative_to(site.resolve()), (key, info[key], site)
    assert Path(info["kernels_dir"]) == Path(info["ssmkit"]).parent / "kernels_cu"
    assert info["include"] == [f"-I{info['kernels_dir']}"]
    from ssmkit._compile import sources_hash

    assert info["hash"] == sources_hash(), "the installed kernels_cu differs from the checkout's"

    demo = venv / ("Scripts/ssmkit-demo.exe" if os.name == "nt" else "bin/ssmkit-demo")
    proc = _run([demo, "--cpu"], cwd=str(work), env=env)
    assert "reference" in proc.stdout.lower()

    # The `ssmkit` command: info lists the installed package's ops; bench outside a checkout says
    # where the GPU benchmarks are (and, without a GPU, times the CPU rows).
    cli = venv / ("Scripts/ssmkit.exe" if os.name == "nt" else "bin/ssmkit")
    info = json.loads(_run([cli, "info", "--json"], cwd=str(work), env=env).stdout)
    assert Path(info["ssmkit"]["path"]).resolve().is_relative_to(site.resolve())
    assert info["cache"]["variants"]["selective_scan"] > 0
    proc = _run([cli, "bench", "--quick", "--out", work / "bench"], cwd=str(work), env=dict(env, SSMKIT_NO_GPU="1"))
    assert "ship with the source checkout" in proc.stdout and (work / "bench" / "bench_cpu.json").is_file()
