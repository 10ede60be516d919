//! The Tokio runtime both binaries serve on.

use tokio::runtime::{Builder, Runtime};

/// A runtime of `io_threads` threads. One thread gets Tokio's current-thread scheduler:
/// every task then runs on the thread that drives the sockets, and a request that hops
/// between tasks (REST handler, batcher, call to rank 0, reply) never goes through the
/// multi-thread scheduler's shared queues and wake-ups: less gateway CPU per request
/// than a one-worker multi-thread runtime (docs/gateway/batching.md).
pub fn build(io_threads: usize) -> std::io::Result<Runtime> {
    let mut builder = if io_threads <= 1 {
        Builder::new_current_thread()
    } else {
        let mut b = Builder::new_multi_thread();
        b.worker_threads(io_threads);
        b
    };
    builder.enable_all().build()
}
