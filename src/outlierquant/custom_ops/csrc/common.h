// Shared helpers for the outlierquant onnxruntime kernels.
//
// The library never links libonnxruntime: ORT_API_MANUAL_INIT makes the C++ wrappers use
// the API table that RegisterCustomOps receives from the runtime that loads us.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

// Hot loops are compiled twice, for AVX2 and for the baseline ISA, and the loader picks one
// at run time (GCC/Clang function multiversioning): wheels must not assume -march=native.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && (!defined(__clang__) || __clang_major__ >= 14)
#define OUTLIERQUANT_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define OUTLIERQUANT_MULTIVERSION
#endif

namespace outlierquant {

inline constexpr const char* kDomain = "ai.outlierquant";
inline constexpr const char* kCpuProvider = "CPUExecutionProvider";

inline Ort::Status InvalidArgument(const std::string& message) {
  return Ort::Status(message.c_str(), ORT_INVALID_ARGUMENT);
}

inline int64_t ElementCount(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

inline std::string ShapeToString(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

// Runs body(begin_row, end_row) over [0, rows) on the session's intra-op thread pool.
// Rows are grouped so that each task carries at least `min_work_per_task` units of work;
// small problems run inline on the calling thread.
template <typename Body>
void ParallelRows(OrtKernelContext* context, int64_t rows, int64_t work_per_row,
                  int64_t min_work_per_task, const Body& body) {
  if (rows <= 0) return;
  int64_t rows_per_task = min_work_per_task / (work_per_row > 0 ? work_per_row : 1);
  if (rows_per_task < 1) rows_per_task = 1;
  const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
  if (tasks <= 1 || context == nullptr) {
    body(int64_t{0}, rows);
    return;
  }
  struct Payload {
    const Body* body;
    int64_t rows;
    int64_t rows_per_task;
  } payload{&body, rows, rows_per_task};
  auto trampoline = [](void* data, size_t task) {
    const auto* p = static_cast<const Payload*>(data);
    const int64_t begin = static_cast<int64_t>(task) * p->rows_per_task;
    const int64_t end = begin + p->rows_per_task < p->rows ? begin + p->rows_per_task : p->rows;
    (*p->body)(begin, end);
  };
  Ort::KernelContext(context).ParallelFor(trampoline, static_cast<size_t>(tasks), 0, &payload);
}

// Symmetric per-row int8 quantization shared by DynamicQuantizePerToken and MixedInt8MatMul.
// scale = max|x| / 127 (1 for an all-zero row); q = clip(round_half_even(x / scale), -127, 127).
float RowScale(const float* row, int64_t count);
void QuantizeRowInt8(const float* row, int64_t count, float scale, int8_t* out);
// Same values shifted by +128 into uint8 (zero point 128), the operand layout MLAS's fast
// u8 x s8 GEMM expects.
void QuantizeRowUint8(const float* row, int64_t count, float scale, uint8_t* out);

Ort::Custom::OrtLiteCustomOp* MakeHadamardTransformOp();
Ort::Custom::OrtLiteCustomOp* MakeDynamicQuantizePerTokenOp();
Ort::Custom::OrtLiteCustomOp* MakeMixedInt8MatMulOp();

}  // namespace outlierquant
