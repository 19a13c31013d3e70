#!/usr/bin/env bash
# Install llama-cpp-python built portably, and extract llama.cpp's converter from its sdist.
#
# Why not `pip install llama-cpp-python`: the default native build segfaults on Q8_0/Q4 models on
# CPUs with AMX, and pip silently reuses a cached wheel built with other flags. We build once with
# CMAKE_ARGS="-DGGML_NATIVE=OFF" into a wheelhouse named after the flags, and install from there.
# convert_hf_to_gguf.py and convert_lora_to_gguf.py (with their conversion/ and gguf-py/ packages)
# ship only in the sdist.
set -euo pipefail

VENV=${1:?usage: install-llama-cpp.sh VENV}
VERSION=$(grep -E '^llama-cpp-python==' constraints.txt | cut -d= -f3)
CACHE=${SLMOPS_BUILD_CACHE:-$HOME/.cache/slmops}
SDIST_DIR=$CACHE/sdist
WHEELS=$CACHE/wheels-native-off
SDIST=$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz
PIP="$VENV/bin/pip"

mkdir -p "$SDIST_DIR" "$WHEELS"
if [ ! -f "$SDIST" ]; then
  echo "==> downloading the llama-cpp-python $VERSION sdist"
  "$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "==> building llama-cpp-python $VERSION with -DGGML_NATIVE=OFF (about 5 minutes on 2 cores)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "$PIP" wheel -q --no-cache-dir --no-deps "$SDIST" -w "$WHEELS"
fi
"$PIP" install -q -c constraints.txt "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl

TOOLS="$VENV/share/slmops/llama.cpp"
rm -rf "$TOOLS.tmp" && mkdir -p "$TOOLS.tmp"
tar xzf "$SDIST" -C "$TOOLS.tmp" --strip-components=3 \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_lora_to_gguf.py" \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
rm -rf "$TOOLS" && mv "$TOOLS.tmp" "$TOOLS"
echo "==> llama-cpp-python $VERSION installed; converter in $TOOLS"
