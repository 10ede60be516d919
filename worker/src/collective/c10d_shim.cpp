// A thin C ABI over libtorch's c10d: TCPStore rendezvous, ProcessGroupGloo (CPU) and,
// with RANKWAY_NCCL, ProcessGroupNCCL (GPU). Tensors are the at::Tensor* that tch's
// Tensor::as_mut_ptr() gives. No exception crosses the boundary (shim_error.hpp; free a
// message with rw_free_error, defined here for every shim). It also carries the one libtorch setting
// the worker needs that tch does not expose: oneDNN on or off (rw_set_onednn,
// rw_onednn_enabled).
#define USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef RANKWAY_NCCL
#define USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "../shim_error.hpp"

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using rankway::guarded;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

void wait(const c10::intrusive_ptr<c10d::Work>& work, const Group* g) {
  if (!work->wait(g->timeout)) {
    throw std::runtime_error("collective did not complete within the timeout");
  }
}

}  // namespace

extern "C" {

// Joins the group: rank 0 hosts the TCPStore on master_port and waits for world_size
// ranks; the others connect to it. backend: 0 = Gloo, 1 = NCCL. `iface` names the
// network interface Gloo binds (empty: `host`, or this machine's hostname).
// `listen_fd`, on rank 0: a socket already bound and listening, which the store serves on
// (and owns) instead of binding every interface; -1 for none.
void* rw_group_init(const char* master_addr, uint16_t master_port, int rank, int world_size,
                    int backend, int64_t store_timeout_ms, int64_t collective_timeout_ms,
                    const char* iface, const char* host, int listen_fd, char** err) {
  Group* out = nullptr;
  guarded(err, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = master_port;
    if (listen_fd >= 0) {
      opts.masterListenFd = listen_fd;
    }
    opts.isServer = rank == 0;
    opts.numWorkers = world_size;
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(store_timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>("rankway", tcp);
    auto timeout = std::chrono::milliseconds(collective_timeout_ms);
    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 0) {
      auto o = c10d::ProcessGroupGloo::Options::create(timeout);
      if (iface != nullptr && iface[0] != '\0') {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
      } else if (host != nullptr && host[0] != '\0') {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
      } else {
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      o->threads = 1;
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, o);
    } else {
#ifdef RANKWAY_NCCL
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, o);
#else
      throw std::runtime_error("this build has no NCCL support (build with --features cuda)");
#endif
    }
    out = new Group{store, pg, timeout};
  });
  return out;
}

int rw_group_all_reduce_sum(void* group, at::Tensor* tensor, char** err) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    wait(g->backend->allreduce(tensors, c10d::AllreduceOptions{}), g);
  });
}

int rw_group_broadcast(void* group, at::Tensor* tensor, int root, char** err) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    wait(g->backend->broadcast(tensors, o), g);
  });
}

// Gathers `input` from every rank into outputs[0..world_size).
int rw_group_all_gather(void* group, at::Tensor* input, at::Tensor** outputs, int world_size, char** err) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, [&] {
    std::vector<at::Tensor> in{*input};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int i = 0; i < world_size; ++i) {
      out[0].push_back(*outputs[i]);
    }
    wait(g->backend->allgather(out, in, c10d::AllgatherOptions{}), g);
  });
}

int rw_group_barrier(void* group, char** err) {
  auto* g = static_cast<Group*>(group);
  return guarded(err, [&] { wait(g->backend->barrier(c10d::BarrierOptions{}), g); });
}

void rw_group_free(void* group) {
  delete static_cast<Group*>(group);
}

void rw_set_onednn(int enabled) {
  at::globalContext().setUserEnabledMkldnn(enabled != 0);
}

int rw_onednn_enabled() {
  return at::globalContext().userEnabledMkldnn() ? 1 : 0;
}

void rw_free_error(char* err) {
  std::free(err);
}

}  // extern "C"
