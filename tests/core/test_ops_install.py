"""A plain ``pip install .`` (pip's default build isolation: no torch at build time) still ends with the kernel.

The wheel carries the C++ sources; the first use builds them (cached under ``$KSWAP_CACHE``) and
``python -m kswap.ops`` says which kernel serves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PARITY = textwrap.dedent("""
    import torch
    from kswap.ops import kernel_info, ms_deform_attn, ms_deform_attn_reference
    info = kernel_info()
    assert info.source == "built on first use", info
    torch.manual_seed(0)
    shapes = torch.tensor([[6, 6], [3, 3]])
    starts = torch.tensor([0, 36])
    value = torch.randn(2, 45, 2, 8, dtype=torch.float64)
    loc = torch.rand(2, 5, 2, 2, 3, 2, dtype=torch.float64)
    attn = torch.rand(2, 5, 2, 2, 3, dtype=torch.float64).softmax(-1)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, attn),
                               ms_deform_attn_reference(value, shapes, starts, loc, attn))
    print("parity ok")
""")


def test_pip_install_with_build_isolation_builds_the_kernel_on_first_use(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # torch and the other runtime packages come from this environment; kswap itself is installed as a user would
    Path(site, "host_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True, cwd=tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    module = subprocess.run([str(python), "-c", "import kswap, pathlib; print(pathlib.Path(kswap.__file__).parent)"],
                            check=True, capture_output=True, text=True, env=env, cwd=tmp_path).stdout.strip()
    assert Path(module).is_relative_to(venv) and not list(Path(module).glob("_C*.so"))  # no prebuilt kernel
    assert (Path(module) / "csrc" / "bindings.cpp").is_file()
    result = subprocess.run([str(python), "-c", PARITY], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "parity ok" in result.stdout, result.stderr[-3000:]
    said = subprocess.run([str(python), "-m", "kswap.ops"], check=True, capture_output=True, text=True, env=env,
                          cwd=tmp_path).stdout
    assert "compiled kernel [built on first use]" in said
    off = subprocess.run([str(python), "-m", "kswap.ops"], check=True, capture_output=True, text=True,
                         env={**env, "KSWAP_JIT": "0"}, cwd=tmp_path).stdout
    assert "PyTorch reference" in off and "KSWAP_JIT=0" in off
