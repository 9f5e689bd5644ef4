// Checks the torch bindings make around the torch-free CUDA launchers: the grid before a launch (axes x and y), and
// after it the launcher's status (a cudaError_t as int, 0 = success; the launchers return cudaGetLastError()). An
// unchecked failed launch leaves the outputs unwritten and its error pending, to be raised by some later op.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace sphere_fast {

// CUDA's limit of blocks on grid axis x; the launchers put rows or samples there, cast to unsigned.
constexpr int64_t kMaxGridX = 2147483647;

inline void check_grid_x(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= kMaxGridX, what, ": ", blocks, " exceed CUDA's limit of ", kMaxGridX,
              " blocks on grid axis x; the input is too large for one launch");
}

// CUDA's limit of blocks on grid axes y and z; the launchers put a row's column blocks or chunks on y.
constexpr int64_t kMaxGridY = 65535;

inline void check_grid_y(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= kMaxGridY, what, ": ", blocks, " exceed CUDA's limit of ", kMaxGridY,
              " blocks on grid axis y; the input is too large for one launch");
}

inline void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace sphere_fast
