//! Where a rank finds its group: the torchrun contract (`RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`), each also a flag,
//! plus the StatefulSet form: the rank from `POD_INDEX` (the pod-index label through the
//! downward API) or from the numeric suffix of the hostname (`workers-a-2` → 2), and the
//! LeaderWorkerSet form (`LWS_LEADER_ADDRESS`, `LWS_GROUP_SIZE`, `LWS_WORKER_INDEX`, which
//! the LWS controller sets in every pod). The torchrun variables win when both are set.

use std::time::Duration;

use clap::Args;

use crate::collective::Shard;
use crate::collective::c10d::{Backend, JoinOptions};

#[derive(Debug, Clone, Args)]
pub struct RendezvousArgs {
    /// This process's rank in its group (default: LWS_WORKER_INDEX, then POD_INDEX, then
    /// the hostname's numeric suffix, then 0).
    #[arg(long, env = "RANK")]
    pub rank: Option<usize>,
    /// Rank from a LeaderWorkerSet pod (0 is the leader).
    #[arg(long, env = "LWS_WORKER_INDEX", hide_env_values = true)]
    pub lws_worker_index: Option<usize>,
    /// Rank from a StatefulSet pod index (downward API, label apps.kubernetes.io/pod-index).
    #[arg(long, env = "POD_INDEX", hide_env_values = true)]
    pub pod_index: Option<usize>,
    /// Ranks in the group; each holds 1/WORLD_SIZE of the model (default: LWS_GROUP_SIZE,
    /// then 1).
    #[arg(long, env = "WORLD_SIZE", value_parser = clap::value_parser!(u32).range(1..))]
    pub world_size: Option<u32>,
    /// Pods in a LeaderWorkerSet group (leader included).
    #[arg(long, env = "LWS_GROUP_SIZE", hide_env_values = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub lws_group_size: Option<u32>,
    /// Address of rank 0, which hosts the c10d TCPStore (default: LWS_LEADER_ADDRESS, then
    /// 127.0.0.1).
    #[arg(long, env = "MASTER_ADDR")]
    pub master_addr: Option<String>,
    /// DNS name of a LeaderWorkerSet group's leader pod.
    #[arg(long, env = "LWS_LEADER_ADDRESS", hide_env_values = true)]
    pub lws_leader_address: Option<String>,
    /// Port of the c10d TCPStore on rank 0.
    #[arg(long, env = "MASTER_PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// Rank of this process among those on its host (informational; used in logs).
    #[arg(long, env = "LOCAL_RANK", default_value_t = 0)]
    pub local_rank: usize,
    /// Ranks started on this host; the default libtorch threads are cores / this.
    #[arg(long, env = "LOCAL_WORLD_SIZE", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub local_world_size: u32,
    /// c10d backend: gloo (CPU) or nccl (GPU, needs the `cuda` build).
    #[arg(long, env = "RANKWAY_DIST_BACKEND", value_enum, default_value_t = Backend::Gloo)]
    pub dist_backend: Backend,
    /// Network interface Gloo uses (as torch's GLOO_SOCKET_IFNAME).
    #[arg(long, env = "GLOO_SOCKET_IFNAME", default_value = "")]
    pub gloo_iface: String,
    /// Address Gloo binds when no interface is named (default: this host's name); rank 0
    /// also serves the TCPStore on it alone (default: on every interface).
    #[arg(long, env = "RANKWAY_DIST_HOST", default_value = "")]
    pub dist_host: String,
    /// How long rendezvous waits for every rank to join.
    #[arg(long, env = "RANKWAY_STORE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "300s")]
    pub store_timeout: Duration,
    /// How long one collective may take; past it the group is broken.
    #[arg(long, env = "RANKWAY_COLLECTIVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub collective_timeout: Duration,
    /// Interval of rank 0's heartbeat when idle: a lost rank is seen within it.
    #[arg(long, env = "RANKWAY_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub heartbeat_interval: Duration,
}

/// The numeric suffix of a StatefulSet pod's hostname: `workers-a-2` → 2.
pub fn ordinal_from_hostname(hostname: &str) -> Option<usize> {
    let (_, suffix) = hostname.rsplit_once('-')?;
    suffix.parse().ok()
}

impl RendezvousArgs {
    /// Ranks in the group: WORLD_SIZE, then LWS_GROUP_SIZE, then 1.
    pub fn world_size(&self) -> u32 {
        self.world_size.or(self.lws_group_size).unwrap_or(1)
    }

    /// Host of rank 0: MASTER_ADDR, then LWS_LEADER_ADDRESS, then loopback.
    pub fn master_addr(&self) -> &str {
        self.master_addr
            .as_deref()
            .or(self.lws_leader_address.as_deref())
            .unwrap_or("127.0.0.1")
    }

    /// This rank's place in the group, checked against the world size.
    pub fn shard(&self) -> Result<Shard, String> {
        let world = self.world_size() as usize;
        let rank = self
            .rank
            .or(self.lws_worker_index)
            .or(self.pod_index)
            .or_else(|| {
                let host = std::env::var("HOSTNAME").ok()?;
                (world > 1).then(|| ordinal_from_hostname(&host)).flatten()
            })
            .unwrap_or(0);
        if rank >= world {
            return Err(format!("rank {rank} is out of range for a world size of {world}"));
        }
        Ok(Shard { rank, world })
    }

    /// How this rank joins; `device` holds the model and the tensors the group exchanges.
    pub fn join_options(&self, shard: Shard, device: tch::Device) -> JoinOptions {
        JoinOptions {
            master_addr: self.master_addr().to_owned(),
            master_port: self.master_port,
            shard,
            backend: self.dist_backend,
            device,
            store_timeout: self.store_timeout,
            collective_timeout: self.collective_timeout,
            iface: self.gloo_iface.clone(),
            host: self.dist_host.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

    fn rdzv(args: &[&str]) -> RendezvousArgs {
        let mut argv = vec!["rankway-worker", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(s) => s.rendezvous,
            _ => unreachable!(),
        }
    }

    #[test]
    fn hostname_ordinals() {
        assert_eq!(ordinal_from_hostname("workers-a-2"), Some(2));
        assert_eq!(ordinal_from_hostname("rankway-worker-10"), Some(10));
        assert_eq!(ordinal_from_hostname("localhost"), None);
        assert_eq!(ordinal_from_hostname("pod-x"), None);
    }

    #[test]
    fn rank_comes_from_flag_then_pod_index() {
        assert_eq!(
            rdzv(&["--world-size=3", "--rank=2"]).shard().unwrap(),
            Shard { rank: 2, world: 3 }
        );
        assert_eq!(
            rdzv(&["--world-size=3", "--pod-index=1"]).shard().unwrap(),
            Shard { rank: 1, world: 3 }
        );
        let err = rdzv(&["--world-size=2", "--rank=2"]).shard().unwrap_err();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn leaderworkerset_variables_fill_in_the_torchrun_contract() {
        let lws = rdzv(&[
            "--lws-leader-address=g-0.g",
            "--lws-group-size=4",
            "--lws-worker-index=3",
        ]);
        assert_eq!(lws.shard().unwrap(), Shard { rank: 3, world: 4 });
        assert_eq!(lws.master_addr(), "g-0.g");
        let both = rdzv(&[
            "--lws-leader-address=g-0.g",
            "--lws-group-size=4",
            "--lws-worker-index=3",
            "--master-addr=10.0.0.1",
            "--world-size=2",
            "--rank=1",
        ]);
        assert_eq!(both.shard().unwrap(), Shard { rank: 1, world: 2 });
        assert_eq!(both.master_addr(), "10.0.0.1");
        let none = rdzv(&[]);
        assert_eq!(none.shard().unwrap(), Shard { rank: 0, world: 1 });
        assert_eq!(none.master_addr(), "127.0.0.1");
    }
}
