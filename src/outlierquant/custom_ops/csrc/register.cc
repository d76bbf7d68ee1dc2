// Entry point called by onnxruntime when the library is loaded with
// SessionOptions.register_custom_ops_library(path).
#include "common.h"

#include <memory>
#include <mutex>

#if defined(_WIN32)
#define OUTLIERQUANT_EXPORT __declspec(dllexport)
#else
#define OUTLIERQUANT_EXPORT __attribute__((visibility("default")))
#endif

namespace outlierquant {
namespace {

struct Registry {
  // Each registration gets its own domain object; all of them must outlive every session.
  std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;
  std::mutex mutex;
};

Registry& GetRegistry() {
  static Registry* registry = new Registry();  // never destroyed: sessions may outlive static teardown
  return *registry;
}

}  // namespace
}  // namespace outlierquant

extern "C" OUTLIERQUANT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                           const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // API version 1 always exists and is enough to report the problem.
    const OrtApi* api_v1 = api_base->GetApi(1);
    std::string message = std::string("outlierquant kernels need onnxruntime C API version ") +
                          std::to_string(ORT_API_VERSION) + " or newer; the loading runtime is " +
                          api_base->GetVersionString();
    return api_v1 != nullptr ? api_v1->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  Ort::InitApi(api);

  using namespace outlierquant;
  Ort::Status status{nullptr};
  try {
    Registry& registry = GetRegistry();
    std::lock_guard<std::mutex> lock(registry.mutex);
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    for (const OrtCustomOp* op : {HadamardTransformOp(), DynamicQuantizePerTokenOp(), MixedInt8MatMulOp()}) {
      domain->Add(op);
    }
    Ort::UnownedSessionOptions(options).Add(*domain);
    registry.domains.push_back(std::move(domain));
  } catch (const Ort::Exception& error) {
    status = Ort::Status(error);
  } catch (const std::exception& error) {
    status = Ort::Status(error);
  } catch (...) {
    status = Ort::Status("outlierquant: registering the kernels failed", ORT_FAIL);
  }
  return status.release();
}
