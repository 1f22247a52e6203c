#!/usr/bin/env bash
# Build ACEsuit's LAMMPS fork (branch `mace`) with package ML-MACE (MPI + OpenMP) against the
# libtorch of the torch installed in the current Python environment, so that
# `pair_style mace` runs the files written by `mmea-calc export`.
#
#   scripts/build_lammps.sh SRC PREFIX
#
#   SRC     a checkout of https://github.com/ACEsuit/lammps, branch `mace` (this script never
#           downloads sources; tested with commit f51963aada27).
#   PREFIX  install prefix; the binary ends up in PREFIX/bin/lmp.
#
# Environment: PYTHON (default: python3 on PATH, the one whose torch is used), JOBS (default:
# nproc), BUILD_DIR (default: PREFIX/build), CMAKE_EXTRA (extra cmake arguments, word-split).
#
# Missing Debian packages (cmake, g++, make, libopenmpi-dev, openmpi-bin) are installed with
# apt-get (root, or sudo) and the script says so before doing it.
#
# Two fixes over a plain configure, both needed with the pip torch wheel:
#   -D CMAKE_CXX_STANDARD=17        libtorch headers need C++17; LAMMPS defaults to C++11;
#   -D MKL_INCLUDE_DIR=/usr/include the wheel's Caffe2 cmake files point caffe2::mkl at an
#                                   include directory that does not exist on this machine.
# The installed lmp carries an RPATH to the wheel's torch/lib, so it runs without
# LD_LIBRARY_PATH, as long as that Python environment stays where it is.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 SRC PREFIX" >&2
    exit 2
fi
SRC=$(realpath "$1")
mkdir -p "$2"
PREFIX=$(realpath "$2")
BUILD_DIR=${BUILD_DIR:-$PREFIX/build}
JOBS=${JOBS:-$(nproc)}
PYTHON=${PYTHON:-python3}

if [[ ! -f $SRC/cmake/CMakeLists.txt || ! -d $SRC/src/ML-MACE ]]; then
    echo "error: $SRC is not a checkout of ACEsuit/lammps branch 'mace'" \
        "(no cmake/CMakeLists.txt or src/ML-MACE)" >&2
    exit 1
fi

# --- Debian packages -------------------------------------------------------------------------
need=()
for pkg in cmake g++ make libopenmpi-dev openmpi-bin; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || need+=("$pkg")
done
if [[ ${#need[@]} -gt 0 ]]; then
    echo ">>> installing missing Debian packages with apt-get: ${need[*]}"
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${need[@]}"
fi

# --- torch of the current Python environment ------------------------------------------------
TORCH_PREFIX=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")
TORCH_LIB=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
TORCH_VERSION=$("$PYTHON" -c "import torch; print(torch.__version__)")
echo ">>> LAMMPS source: $SRC ($(git -C "$SRC" rev-parse --short=12 HEAD 2>/dev/null || echo 'not a git checkout'))"
echo ">>> torch $TORCH_VERSION from $TORCH_PREFIX"
echo ">>> build dir $BUILD_DIR, prefix $PREFIX, $JOBS jobs"

# --- configure, build, install ---------------------------------------------------------------
# shellcheck disable=SC2086
cmake -S "$SRC/cmake" -B "$BUILD_DIR" \
    -D CMAKE_BUILD_TYPE=Release \
    -D CMAKE_INSTALL_PREFIX="$PREFIX" \
    -D CMAKE_PREFIX_PATH="$TORCH_PREFIX" \
    -D CMAKE_CXX_STANDARD=17 \
    -D MKL_INCLUDE_DIR=/usr/include \
    -D BUILD_MPI=ON \
    -D BUILD_OMP=ON \
    -D PKG_ML-MACE=ON \
    -D CMAKE_INSTALL_RPATH="$TORCH_LIB" \
    -D CMAKE_INSTALL_RPATH_USE_LINK_PATH=ON \
    ${CMAKE_EXTRA:-}
cmake --build "$BUILD_DIR" -j "$JOBS"
cmake --install "$BUILD_DIR"

LMP=$PREFIX/bin/lmp
# capture first and never grep -q in a pipe: an early exit SIGPIPEs the writer (pipefail)
HELP=$("$LMP" -h)
if ! grep -A 40 '^\* Pair styles:' <<<"$HELP" | grep -w mace >/dev/null; then
    echo "error: $LMP was built but 'lmp -h' does not list pair style mace" >&2
    exit 1
fi
echo ">>> LAMMPS with pair_style mace: $LMP"
echo ">>> use it with: export MMEA_LAMMPS=$LMP"
