//! Safe binding of the c10d shim (`c10d_shim.cpp`): a torch c10d process group joined
//! through a TCPStore, Gloo on CPU or NCCL on GPU, and [`set_onednn`]. With `shim.rs`
//! and `models/linear/fbgemm.rs`, one of the three modules that hold `unsafe`.
#![allow(unsafe_code)]

use std::ffi::{CString, c_char, c_int, c_void};
use std::time::Duration;

use tch::Tensor;

use super::{Collective, CollectiveError, Shard};

unsafe extern "C" {
    fn rw_group_init(
        master_addr: *const c_char,
        master_port: u16,
        rank: c_int,
        world_size: c_int,
        backend: c_int,
        store_timeout_ms: i64,
        collective_timeout_ms: i64,
        iface: *const c_char,
        host: *const c_char,
        listen_fd: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn rw_group_all_reduce_sum(
        group: *mut c_void,
        tensor: *mut torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn rw_group_broadcast(
        group: *mut c_void,
        tensor: *mut torch_sys::C_tensor,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn rw_group_all_gather(
        group: *mut c_void,
        input: *mut torch_sys::C_tensor,
        outputs: *mut *mut torch_sys::C_tensor,
        world_size: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn rw_group_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn rw_group_free(group: *mut c_void);
    fn rw_set_onednn(enabled: c_int);
    fn rw_onednn_enabled() -> c_int;
}

/// Lets libtorch use oneDNN for the CPU operators it has kernels for, or not, for the
/// whole process (`torch.backends.mkldnn.enabled` in Python). Set it before a model
/// runs: libtorch reads the flag on every call without a lock.
pub fn set_onednn(enabled: bool) {
    // SAFETY: stores one bool in libtorch's global context; nothing else to uphold.
    unsafe { rw_set_onednn(c_int::from(enabled)) }
}

/// Whether libtorch may use oneDNN, as libtorch itself reports it.
pub fn onednn_enabled() -> bool {
    // SAFETY: reads one bool from libtorch's global context.
    unsafe { rw_onednn_enabled() != 0 }
}

/// Which c10d backend a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// ProcessGroupGloo, on CPU.
    Gloo,
    /// ProcessGroupNCCL, on GPU (needs the `cuda` build).
    Nccl,
}

/// How to join a group.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub master_addr: String,
    pub master_port: u16,
    pub shard: Shard,
    pub backend: Backend,
    /// The device of the tensors it exchanges: CPU for Gloo, this rank's GPU for NCCL.
    pub device: tch::Device,
    /// How long the store waits for every rank to arrive.
    pub store_timeout: Duration,
    /// How long one collective may take before the group counts as broken.
    pub collective_timeout: Duration,
    /// Network interface Gloo binds (GLOO_SOCKET_IFNAME); empty for `host`.
    pub iface: String,
    /// Address Gloo binds when no interface is named; empty for this host's name.
    pub host: String,
}

/// Takes the message the shim allocated, if any.
fn take_error(err: *mut c_char, op: &'static str) -> CollectiveError {
    CollectiveError {
        op,
        message: crate::shim::take_message(err),
    }
}

/// A joined torch c10d process group.
pub struct ProcessGroup {
    raw: *mut c_void,
    shard: Shard,
    device: tch::Device,
}

// SAFETY: the c10d backend is used from one thread at a time (the model thread owns the
// group); moving it between threads is fine, as torch's own Python bindings do.
unsafe impl Send for ProcessGroup {}

/// Rank 0's store socket: bound to this rank's own address (RANKWAY_DIST_HOST, the pod
/// IP in Kubernetes) when it has one, so the store is not reachable on every interface;
/// -1 (c10d binds every interface) otherwise, and on the other ranks. The store owns the
/// descriptor from then on.
fn store_socket(opts: &JoinOptions) -> Result<c_int, CollectiveError> {
    use std::os::fd::IntoRawFd;
    if opts.shard.rank != 0 || opts.host.is_empty() {
        return Ok(-1);
    }
    let listener =
        std::net::TcpListener::bind((opts.host.as_str(), opts.master_port)).map_err(|e| CollectiveError {
            op: "init",
            message: format!("cannot bind the store on {}:{}: {e}", opts.host, opts.master_port),
        })?;
    Ok(listener.into_raw_fd())
}

impl ProcessGroup {
    /// Rendezvous: blocks until every rank has joined or the store times out.
    pub fn join(opts: &JoinOptions) -> Result<Self, CollectiveError> {
        if opts.backend == Backend::Nccl && !opts.device.is_cuda() {
            return Err(CollectiveError {
                op: "init",
                message: "NCCL exchanges CUDA tensors: --dist-backend nccl needs --device cuda or cuda:N"
                    .into(),
            });
        }
        let cstr = |s: &str| {
            CString::new(s).map_err(|_| CollectiveError {
                op: "init",
                message: format!("NUL byte in {s:?}"),
            })
        };
        let (addr, iface, host) = (cstr(&opts.master_addr)?, cstr(&opts.iface)?, cstr(&opts.host)?);
        let listen_fd = store_socket(opts)?;
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: all strings are valid NUL-terminated C strings that outlive the call;
        // `err` is a valid out-pointer.
        let raw = unsafe {
            rw_group_init(
                addr.as_ptr(),
                opts.master_port,
                opts.shard.rank as c_int,
                opts.shard.world as c_int,
                match opts.backend {
                    Backend::Gloo => 0,
                    Backend::Nccl => 1,
                },
                opts.store_timeout.as_millis() as i64,
                opts.collective_timeout.as_millis() as i64,
                iface.as_ptr(),
                host.as_ptr(),
                listen_fd,
                &mut err,
            )
        };
        if raw.is_null() {
            return Err(take_error(err, "init"));
        }
        Ok(Self {
            raw,
            shard: opts.shard,
            device: opts.device,
        })
    }

    /// Gathers `input` from every rank; the result is in rank order.
    pub fn all_gather(&self, input: &mut Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        let mut outputs: Vec<Tensor> = (0..self.shard.world).map(|_| input.empty_like()).collect();
        let mut ptrs: Vec<*mut torch_sys::C_tensor> = outputs.iter_mut().map(|t| t.as_mut_ptr()).collect();
        let mut err = std::ptr::null_mut();
        // SAFETY: `ptrs` holds `world` live tensors (kept alive by `outputs`) of the
        // input's shape; `input` is live for the call.
        let rc = unsafe {
            rw_group_all_gather(
                self.raw,
                input.as_mut_ptr(),
                ptrs.as_mut_ptr(),
                ptrs.len() as c_int,
                &mut err,
            )
        };
        if rc != 0 {
            Err(take_error(err, "all_gather"))
        } else {
            Ok(outputs)
        }
    }

    /// Waits until every rank reaches the barrier.
    pub fn barrier(&self) -> Result<(), CollectiveError> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `self.raw` is a live group.
        let rc = unsafe { rw_group_barrier(self.raw, &mut err) };
        if rc != 0 {
            Err(take_error(err, "barrier"))
        } else {
            Ok(())
        }
    }
}

impl Collective for ProcessGroup {
    fn shard(&self) -> Shard {
        self.shard
    }

    fn device(&self) -> tch::Device {
        self.device
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        in_place(tensor, |t| {
            let mut err = std::ptr::null_mut();
            // SAFETY: `self.raw` is a live group; `t` is a live at::Tensor for the call.
            let rc = unsafe { rw_group_all_reduce_sum(self.raw, t.as_mut_ptr(), &mut err) };
            if rc != 0 {
                Err(take_error(err, "all_reduce"))
            } else {
                Ok(())
            }
        })
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        in_place(tensor, |t| {
            let mut err = std::ptr::null_mut();
            // SAFETY: `self.raw` is a live group; `t` is a live at::Tensor for the call.
            let rc = unsafe { rw_group_broadcast(self.raw, t.as_mut_ptr(), root as c_int, &mut err) };
            if rc != 0 {
                Err(take_error(err, "broadcast"))
            } else {
                Ok(())
            }
        })
    }
}

/// Runs the in-place collective `op` on `tensor`. The CPU backend reads and writes a
/// tensor's storage as if it were contiguous (a view, a text pass cut to its longest
/// row, reached the followers scrambled), so a view goes through a contiguous copy,
/// written back after.
fn in_place(
    tensor: &mut Tensor,
    op: impl FnOnce(&mut Tensor) -> Result<(), CollectiveError>,
) -> Result<(), CollectiveError> {
    if tensor.is_contiguous() {
        return op(tensor);
    }
    let mut dense = tensor.contiguous();
    op(&mut dense)?;
    tensor.copy_(&dense);
    Ok(())
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rw_group_init and is freed once.
        unsafe { rw_group_free(self.raw) }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tch::Kind;

    fn join(rank: usize, port: u16) -> ProcessGroup {
        join_world(rank, 2, port)
    }

    /// Rank `rank` of a Gloo group of `world` on loopback (ranks as threads of a test).
    pub(crate) fn join_world(rank: usize, world: usize, port: u16) -> ProcessGroup {
        ProcessGroup::join(&JoinOptions {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            shard: Shard { rank, world },
            backend: Backend::Gloo,
            device: tch::Device::Cpu,
            store_timeout: Duration::from_secs(30),
            collective_timeout: Duration::from_secs(30),
            iface: String::new(),
            host: "127.0.0.1".into(),
        })
        .expect("join")
    }

    /// Two ranks in two threads of this process, over real Gloo on loopback.
    #[test]
    fn every_collective_works_between_two_ranks() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let run = move |rank: usize| {
            let pg = join(rank, port);
            let opts = (Kind::Float, tch::Device::Cpu);
            let mut sum = Tensor::full([3], (rank + 1) as f64, opts);
            pg.all_reduce_sum(&mut sum).unwrap();
            let mut b = if rank == 0 {
                Tensor::from_slice(&[7.0f32, 8.0])
            } else {
                Tensor::zeros([2], opts)
            };
            pg.broadcast(&mut b, 0).unwrap();
            let mut mine = Tensor::full([2], rank as f64, opts);
            let gathered = pg.all_gather(&mut mine).unwrap();
            if rank == 0 {
                // The store listens on this rank's own address (RANKWAY_DIST_HOST) only.
                let at = |ip: &str| std::net::TcpStream::connect((ip, port));
                assert!(at("127.0.0.1").is_ok(), "the store listens on its host");
                let elsewhere = at("127.0.0.2").expect_err("the store must not listen on every address");
                assert_eq!(elsewhere.kind(), std::io::ErrorKind::ConnectionRefused);
            }
            pg.barrier().unwrap();
            (
                Vec::<f32>::try_from(sum).unwrap(),
                Vec::<f32>::try_from(b).unwrap(),
                gathered
                    .iter()
                    .map(|t| Vec::<f32>::try_from(t).unwrap())
                    .collect::<Vec<_>>(),
            )
        };
        let other = std::thread::spawn(move || run(1));
        let here = run(0);
        let there = other.join().unwrap();
        for (sum, b, gathered) in [here, there] {
            assert_eq!(sum, vec![3.0; 3], "1 + 2 on every rank");
            assert_eq!(b, vec![7.0, 8.0], "rank 0's values everywhere");
            assert_eq!(gathered, vec![vec![0.0, 0.0], vec![1.0, 1.0]], "in rank order");
        }
    }

    #[test]
    fn nccl_on_the_cpu_is_refused_before_the_rendezvous() {
        let err = ProcessGroup::join(&JoinOptions {
            master_addr: "127.0.0.1".into(),
            master_port: 1, // never reached
            shard: Shard { rank: 0, world: 2 },
            backend: Backend::Nccl,
            device: tch::Device::Cpu,
            store_timeout: Duration::from_secs(30),
            collective_timeout: Duration::from_secs(30),
            iface: String::new(),
            host: "127.0.0.1".into(),
        })
        .err()
        .expect("NCCL with CPU tensors must be refused");
        assert!(err.message.contains("--device cuda"), "{}", err.message);
    }

    #[test]
    fn the_onednn_switch_reaches_libtorch() {
        let before = onednn_enabled();
        set_onednn(!before);
        assert_eq!(onednn_enabled(), !before);
        set_onednn(before);
        assert_eq!(onednn_enabled(), before);
    }

    #[test]
    fn a_failed_rendezvous_is_an_error_not_an_abort() {
        // Rank 1 of a group whose rank 0 never comes: the store times out.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = ProcessGroup::join(&JoinOptions {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            shard: Shard { rank: 1, world: 2 },
            backend: Backend::Gloo,
            device: tch::Device::Cpu,
            store_timeout: Duration::from_millis(1500),
            collective_timeout: Duration::from_secs(1),
            iface: String::new(),
            host: "127.0.0.1".into(),
        })
        .err()
        .expect("no rank 0: join must fail");
        assert_eq!(err.op, "init");
        assert!(!err.message.is_empty());
    }
}
