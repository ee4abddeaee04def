// pybind11 bindings: the one Python module crossspec_kernels._C.
//
// Torch-ABI-free on purpose: tensors cross this boundary as Python ints (data_ptr values, strides,
// sizes, dtype codes) and the stream as its integer handle, so one build works with any torch.
// Validation of shapes, dtypes and devices happens in crossspec_kernels/ops/<op>.py; this file only
// converts arguments, calls the launcher and turns a cudaError_t into a Python exception.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "events_to_frames.cuh"
#include "verify.cuh"

#ifndef CROSSSPEC_CUDA_ARCHS
#error "CROSSSPEC_CUDA_ARCHS must be defined by the build (CMakeLists.txt)"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* as_pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

crossspec::DType as_dtype(int code, const char* argument) {
  if (code < 0 || code > 2) {
    throw py::value_error(std::string("crossspec_kernels._C.verify: ") + argument +
                          " must be a dtype code 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                          std::to_string(code));
  }
  return static_cast<crossspec::DType>(code);
}

void check(cudaError_t status, const char* op) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("crossspec_kernels._C.") + op + ": " +
                             cudaGetErrorString(status));
  }
}

void verify(std::uintptr_t target_logits, int logits_dtype, std::int64_t logits_stride_batch,
            std::int64_t logits_stride_slot, std::uintptr_t draft_probs, int probs_dtype,
            std::int64_t probs_stride_batch, std::int64_t probs_stride_slot,
            std::uintptr_t draft_tokens, std::uintptr_t parents, std::uintptr_t temperature,
            std::uintptr_t seed, std::uintptr_t offset, std::int64_t batch, std::int64_t num_nodes,
            std::int64_t vocab, std::uintptr_t next_child, std::uintptr_t emitted,
            std::uintptr_t tokens, std::uintptr_t num_accepted, std::uintptr_t path,
            std::uintptr_t stream) {
  crossspec::VerifyParams params{};
  params.target_logits = as_pointer<const void>(target_logits);
  params.logits_dtype = as_dtype(logits_dtype, "logits_dtype");
  params.logits_stride_batch = logits_stride_batch;
  params.logits_stride_slot = logits_stride_slot;
  params.draft_probs = as_pointer<const void>(draft_probs);
  params.probs_dtype = as_dtype(probs_dtype, "probs_dtype");
  params.probs_stride_batch = probs_stride_batch;
  params.probs_stride_slot = probs_stride_slot;
  params.draft_tokens = as_pointer<const std::int64_t>(draft_tokens);
  params.parents = as_pointer<const std::int64_t>(parents);
  params.temperature = as_pointer<const float>(temperature);
  params.seed = as_pointer<const std::int64_t>(seed);
  params.offset = as_pointer<const std::int64_t>(offset);
  params.batch = batch;
  params.num_nodes = num_nodes;
  params.vocab = vocab;
  params.next_child = as_pointer<std::int32_t>(next_child);
  params.emitted = as_pointer<std::int64_t>(emitted);
  params.tokens = as_pointer<std::int64_t>(tokens);
  params.num_accepted = as_pointer<std::int64_t>(num_accepted);
  params.path = as_pointer<std::int64_t>(path);

  cudaError_t status;
  {
    // The launcher only enqueues work; other Python threads may run meanwhile.
    py::gil_scoped_release release;
    status = crossspec::verify(params, as_pointer<CUstream_st>(stream));
  }
  check(status, "verify");
}

crossspec::IntDType as_int_dtype(int code, const char* argument) {
  if (code < 0 || code > 4) {
    throw py::value_error(std::string("crossspec_kernels._C.events_to_frames: ") + argument +
                          " must be a dtype code 0 (int8), 1 (uint8/bool), 2 (int16), 3 (int32) or "
                          "4 (int64), got " +
                          std::to_string(code));
  }
  return static_cast<crossspec::IntDType>(code);
}

void events_to_frames(int representation, std::uintptr_t x, std::uintptr_t y, int coord_dtype,
                      std::uintptr_t t, std::uintptr_t p, int polarity_dtype,
                      std::int64_t num_events, std::int64_t height, std::int64_t width,
                      std::int64_t num_slices, int fixed_point_bits, std::uintptr_t workspace,
                      std::uintptr_t output, std::uintptr_t stream) {
  if (representation < 0 || representation > 2) {
    throw py::value_error(
        "crossspec_kernels._C.events_to_frames: representation must be 0 (eventgpt), "
        "1 (histogram) or 2 (voxel), got " +
        std::to_string(representation));
  }
  const auto coords = as_int_dtype(coord_dtype, "coord_dtype");
  if (coords == crossspec::IntDType::kInt8 || coords == crossspec::IntDType::kUInt8) {
    throw py::value_error(
        "crossspec_kernels._C.events_to_frames: coord_dtype must be 2 (int16), 3 (int32) or 4 "
        "(int64), got " +
        std::to_string(coord_dtype));
  }
  crossspec::EventsToFramesParams params{};
  params.representation = static_cast<crossspec::EventRepresentation>(representation);
  params.x = as_pointer<const void>(x);
  params.y = as_pointer<const void>(y);
  params.coord_dtype = coords;
  params.t = as_pointer<const std::int64_t>(t);
  params.p = as_pointer<const void>(p);
  params.polarity_dtype = as_int_dtype(polarity_dtype, "polarity_dtype");
  params.num_events = num_events;
  params.height = height;
  params.width = width;
  params.num_slices = num_slices;
  params.fixed_point_bits = fixed_point_bits;
  params.workspace = as_pointer<void>(workspace);
  params.output = as_pointer<void>(output);

  cudaError_t status;
  {
    py::gil_scoped_release release;
    status = crossspec::events_to_frames(params, as_pointer<CUstream_st>(stream));
  }
  check(status, "events_to_frames");
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the error, report none
    return 0;
  }
  return count;
}

std::string cuda_archs() {
  std::string archs = CROSSSPEC_CUDA_ARCHS;
  std::replace(archs.begin(), archs.end(), ',', ';');
  return archs;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "crossspec_kernels CUDA kernels (torch-ABI-free: pointers, sizes, strides, stream)";

  m.def(
      "verify", &verify, py::kw_only(), py::arg("target_logits"), py::arg("logits_dtype"),
      py::arg("logits_stride_batch"), py::arg("logits_stride_slot"), py::arg("draft_probs") = 0,
      py::arg("probs_dtype") = 0, py::arg("probs_stride_batch") = 0,
      py::arg("probs_stride_slot") = 0, py::arg("draft_tokens"), py::arg("parents"),
      py::arg("temperature"), py::arg("seed"), py::arg("offset"), py::arg("batch"),
      py::arg("num_nodes"), py::arg("vocab"), py::arg("next_child"), py::arg("emitted"),
      py::arg("tokens"), py::arg("num_accepted"), py::arg("path"), py::arg("stream") = 0,
      "Enqueue rejection resampling (crossspec::verify) on `stream`.\n\n"
      "Every tensor argument is a device data_ptr as int (draft_probs=0 means none); dtype codes\n"
      "are 0=float32, 1=float16, 2=bfloat16; strides are in elements; `stream` is a cudaStream_t\n"
      "handle as int (0 = legacy default stream). Raises RuntimeError on a CUDA error.");

  m.def("events_to_frames", &events_to_frames, py::kw_only(), py::arg("representation"),
        py::arg("x"), py::arg("y"), py::arg("coord_dtype"), py::arg("t"), py::arg("p"),
        py::arg("polarity_dtype"), py::arg("num_events"), py::arg("height"), py::arg("width"),
        py::arg("num_slices"), py::arg("fixed_point_bits") = 24, py::arg("workspace") = 0,
        py::arg("output"), py::arg("stream") = 0,
        "Enqueue event rasterization (crossspec::events_to_frames) on `stream`.\n\n"
        "representation: 0=eventgpt (output uint8 [F,3,H,W], workspace int32 [ceil(F*H*W/16)]),\n"
        "1=histogram (output int32 [2,H,W], no workspace), 2=voxel (output float32 [B,H,W],\n"
        "workspace int64 [B*H*W]); num_slices is F or B. Tensor arguments are device data_ptr\n"
        "ints; dtype codes are 0=int8, 1=uint8/bool, 2=int16, 3=int32, 4=int64; `stream` is a\n"
        "cudaStream_t handle as int. Raises RuntimeError on a CUDA error.");

  m.def("cuda_archs", &cuda_archs,
        "CUDA architectures this module was compiled for, e.g. '80;90a'.");
  m.def(
      "cuda_version", []() { return CUDART_VERSION; },
      "CUDART_VERSION the module was compiled against (e.g. 13000 for CUDA 13.0).");
  m.def("device_count", &device_count,
        "Number of visible CUDA devices; 0 when there is no device or no driver (never raises).");
}
