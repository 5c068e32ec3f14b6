#!/bin/sh
# Install the torch-free line runtime (`edgeinspect[runtime]`) into a fresh virtualenv at PREFIX.
# The one install step of both container images (Dockerfile, Dockerfile.jetson) and of the test that
# proves it in CI (tests/test_runtime_install.py), so what CI runs is what the images run.
#
# usage: deploy/install-runtime.sh PREFIX [SOURCE]      SOURCE: the repository or a wheel (default .)
# environment:
#   VENV_ARGS         extra `python3 -m venv` arguments (Jetson: --system-site-packages, to see JetPack's
#                     tensorrt and its OpenCV built with GStreamer)
#   PIP_ARGS          extra `pip install` arguments (Jetson: --extra-index-url of NVIDIA's onnxruntime-gpu wheels)
#   EXTRA_PACKAGES    more packages to install beside the runtime (Jetson: onnxruntime-gpu cuda-python)
#   USE_SYSTEM_OPENCV 1: remove pip's opencv-python-headless afterwards, so the system's cv2 is imported
set -eu
prefix=${1:?usage: install-runtime.sh PREFIX [SOURCE]}
source=${2:-.}
# shellcheck disable=SC2086  # VENV_ARGS and PIP_ARGS are lists of arguments
python3 -m venv ${VENV_ARGS:-} "$prefix"
# shellcheck disable=SC2086
"$prefix/bin/pip" install --no-cache-dir ${PIP_ARGS:-} "$source[runtime]" ${EXTRA_PACKAGES:-}
if [ "${USE_SYSTEM_OPENCV:-0}" = 1 ]; then
    "$prefix/bin/pip" uninstall -y opencv-python-headless
fi
# the runtime must work without torch: fail the build if anything pulled it in
"$prefix/bin/python" -I - <<'PY'  # -I: not the source tree in the working directory
import importlib.util, sys
import edgeinspect.runtime.daemon, edgeinspect.runtime.predictor  # noqa: E401,F401
assert "torch" not in sys.modules, "the runtime imported torch"
assert importlib.util.find_spec("torch") is None, "torch is installed in the runtime environment"
PY
"$prefix/bin/edgeinspect" --version
