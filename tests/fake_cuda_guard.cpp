// Registers c10's own FakeGuardImpl as the device guard of CUDA, so that a CPU-only torch can run
// FakeTensorMode programs whose tensors say `cuda`: ops that take a device guard (copy_,
// contiguous, ...) otherwise stop with "PyTorch is not linked with support for cuda devices".
// Loaded only by tests/fake_cuda.py, only into processes without a real CUDA device.
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace {
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
}  // namespace
