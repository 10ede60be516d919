//! `rankway-worker launch`: a local launcher in the spirit of torchrun. It starts
//! `--groups` groups of `--ranks-per-group` ranks on loopback with the rendezvous
//! environment set, restarts a whole group (with backoff) when any of its ranks exits,
//! and stops everything on SIGINT/SIGTERM.
//!
//! Ports: rank 0 of group `g` serves on `--port + g`; follower `r` of group `g` on
//! `--follower-port + g * ranks_per_group + r`; group `g`'s TCPStore is on
//! `--master-port + g`.
//!
//! A rank it starts dies with it: the rank asks the kernel for SIGTERM when the launcher
//! exits ([`follow_launcher`]), so even a SIGKILLed launcher leaves no group behind.

use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Set on every rank `launch` starts: the launcher's pid.
pub const LAUNCHER_PID_ENV: &str = "RANKWAY_LAUNCHER_PID";

/// In a rank started by `launch` (`RANKWAY_LAUNCHER_PID` set): has the kernel send this
/// process SIGTERM, which drains it like any shutdown, when the launcher exits; fails if
/// the launcher is already gone. Call it on the main thread, which lives as long as the
/// process: the parent-death signal belongs to the thread that asks for it. A no-op
/// elsewhere (Kubernetes, a rank started by hand).
pub fn follow_launcher() -> anyhow::Result<()> {
    let Some(pid) = std::env::var_os(LAUNCHER_PID_ENV) else {
        return Ok(());
    };
    let pid: i32 = pid
        .to_str()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{LAUNCHER_PID_ENV}={pid:?} is not a pid"))?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
    // The launcher may have died between starting this process and the call above.
    anyhow::ensure!(
        nix::unistd::getppid() == Pid::from_raw(pid),
        "the launcher (pid {pid}) is gone"
    );
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct LaunchArgs {
    /// Number of groups.
    #[arg(long, env = "RANKWAY_GROUPS_COUNT", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub groups: u32,
    /// Ranks in each group (the world size).
    #[arg(long, env = "RANKWAY_RANKS_PER_GROUP", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub ranks_per_group: u32,
    /// Host every rank binds and rank 0 is reached at.
    #[arg(long, env = "RANKWAY_LAUNCH_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// gRPC port of group 0's rank 0; group g's rank 0 uses this + g.
    #[arg(long, env = "RANKWAY_LAUNCH_PORT", default_value_t = 9000)]
    pub port: u16,
    /// First health port of the followers; 0: every follower binds a free port.
    #[arg(long, env = "RANKWAY_LAUNCH_FOLLOWER_PORT", default_value_t = 9100)]
    pub follower_port: u16,
    /// Metrics port of the first rank; the i-th rank started uses this + i. 0: every rank
    /// binds a free port (its "worker listening" log line tells which).
    #[arg(long, env = "RANKWAY_LAUNCH_METRICS_PORT", default_value_t = 9400)]
    pub metrics_port: u16,
    /// TCPStore port of group 0; group g uses this + g.
    #[arg(long, env = "RANKWAY_LAUNCH_MASTER_PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// First wait before restarting a broken group; doubles up to --max-backoff.
    #[arg(long, env = "RANKWAY_LAUNCH_BACKOFF", value_parser = humantime::parse_duration, default_value = "1s")]
    pub backoff: Duration,
    /// Longest wait before restarting a group.
    #[arg(long, env = "RANKWAY_LAUNCH_MAX_BACKOFF", value_parser = humantime::parse_duration, default_value = "30s")]
    pub max_backoff: Duration,
    /// How long the other ranks of a broken group get to exit by themselves.
    #[arg(long, env = "RANKWAY_LAUNCH_GRACE", value_parser = humantime::parse_duration, default_value = "5s")]
    pub grace: Duration,
    /// Arguments for every `rankway-worker serve` (after `--`), e.g. `-- --model mlp`.
    #[arg(last = true)]
    pub serve_args: Vec<String>,
}

/// Where one rank runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSpec {
    pub group: u32,
    pub rank: u32,
    pub listen: String,
    pub env: Vec<(String, String)>,
}

impl LaunchArgs {
    pub fn group_name(g: u32) -> String {
        format!("g{g}")
    }

    /// Address of group `g`'s rank 0.
    pub fn leader_addr(&self, g: u32) -> String {
        format!("{}:{}", self.host, self.port as u32 + g)
    }

    /// `base + i` on the host, or port 0 (any free one) when `base` is 0.
    fn nth_port(&self, base: u16, i: u32) -> String {
        let port = if base == 0 { 0 } else { base as u32 + i };
        format!("{}:{port}", self.host)
    }

    /// The ranks of group `g` with their environment (the torchrun contract).
    pub fn ranks(&self, g: u32) -> Vec<RankSpec> {
        let n = self.ranks_per_group;
        (0..n)
            .map(|r| {
                let listen = if r == 0 {
                    self.leader_addr(g)
                } else {
                    self.nth_port(self.follower_port, g * n + r)
                };
                let env = [
                    ("RANK", r.to_string()),
                    ("WORLD_SIZE", n.to_string()),
                    ("MASTER_ADDR", self.host.clone()),
                    ("MASTER_PORT", (self.master_port as u32 + g).to_string()),
                    ("LOCAL_RANK", (g * n + r).to_string()),
                    ("LOCAL_WORLD_SIZE", (self.groups * n).to_string()),
                    ("RANKWAY_DIST_HOST", self.host.clone()),
                    ("RANKWAY_GROUP", Self::group_name(g)),
                    ("RANKWAY_LISTEN", listen.clone()),
                    (
                        "RANKWAY_METRICS_LISTEN",
                        self.nth_port(self.metrics_port, g * n + r),
                    ),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                RankSpec {
                    group: g,
                    rank: r,
                    listen,
                    env,
                }
            })
            .collect()
    }
}

fn signal(child: &Child, sig: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

/// Waits until every child has exited, SIGKILLing those still up after `grace`.
async fn reap(children: &mut [Child], grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    for c in children.iter_mut() {
        if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

async fn supervise(args: LaunchArgs, g: u32, mut stop: watch::Receiver<bool>) {
    let exe = std::env::current_exe().expect("path of this executable");
    let mut backoff = args.backoff;
    let mut generation = 0u32;
    loop {
        generation += 1;
        let specs = args.ranks(g);
        let mut children: Vec<Child> = Vec::new();
        for spec in &specs {
            let mut cmd = Command::new(&exe);
            cmd.arg("serve")
                .args(&args.serve_args)
                .envs(spec.env.iter().cloned())
                .env(LAUNCHER_PID_ENV, std::process::id().to_string())
                .stdin(Stdio::null());
            // Spawned from a runtime worker thread, which lives until every child is
            // reaped: a rank's parent-death signal follows that thread, not the process.
            match cmd.spawn() {
                Ok(c) => children.push(c),
                Err(e) => tracing::error!(group = g, rank = spec.rank, error = %e, "cannot start rank"),
            }
        }
        let pids: Vec<u32> = children.iter().filter_map(Child::id).collect();
        tracing::info!(group = %LaunchArgs::group_name(g), leader = %args.leader_addr(g), ranks = specs.len(), generation, ?pids, "group started");
        let started = Instant::now();

        // Watch for the first rank to exit, or for the stop signal.
        let first_exit = loop {
            if let Some(found) = children
                .iter_mut()
                .enumerate()
                .find_map(|(i, c)| c.try_wait().ok().flatten().map(|s| (i, s)))
            {
                break Some(found);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.wait_for(|s| *s) => break None,
            }
        };
        let Some((rank, status)) = first_exit else {
            // Rank 0 first, so it stops taking batches and releases the followers.
            for c in &children {
                signal(c, Signal::SIGTERM);
            }
            reap(&mut children, args.grace).await;
            return;
        };
        tracing::warn!(group = %LaunchArgs::group_name(g), rank, %status, "a rank exited; restarting the whole group");
        reap(&mut children, args.grace).await;
        if started.elapsed() > args.max_backoff {
            backoff = args.backoff; // it ran for a good while: start the backoff over
        }
        tracing::info!(group = %LaunchArgs::group_name(g), ?backoff, "waiting before the restart");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(args.max_backoff);
    }
}

/// Runs every group until `shutdown` resolves.
pub async fn launch(args: LaunchArgs, shutdown: impl std::future::Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = (0..args.groups)
        .map(|g| tokio::spawn(supervise(args.clone(), g, stop_rx.clone())))
        .collect();
    for g in 0..args.groups {
        println!(
            "group {} rank 0: {}",
            LaunchArgs::group_name(g),
            args.leader_addr(g)
        );
    }
    shutdown.await;
    tracing::info!("stopping every group");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Cli, Command};
    use clap::Parser;

    #[test]
    fn ranks_get_the_rendezvous_contract() {
        let cli = Cli::try_parse_from([
            "rankway-worker",
            "launch",
            "--groups=2",
            "--ranks-per-group=3",
            "--",
            "--model",
            "mlp",
        ])
        .unwrap();
        let Command::Launch(args) = cli.command else {
            panic!("not launch")
        };
        assert_eq!(args.serve_args, vec!["--model", "mlp"]);
        let g1 = args.ranks(1);
        assert_eq!(g1.len(), 3);
        assert_eq!(g1[0].listen, "127.0.0.1:9001");
        assert_eq!(g1[2].listen, "127.0.0.1:9105");
        let env = |r: usize, k: &str| g1[r].env.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(env(2, "RANK"), "2");
        assert_eq!(env(2, "WORLD_SIZE"), "3");
        assert_eq!(env(2, "MASTER_PORT"), "29501");
        assert_eq!(env(2, "LOCAL_WORLD_SIZE"), "6");
        assert_eq!(env(0, "RANKWAY_GROUP"), "g1");
        assert_eq!(env(2, "RANKWAY_METRICS_LISTEN"), "127.0.0.1:9405");

        let any = Cli::try_parse_from([
            "rankway-worker",
            "launch",
            "--metrics-port=0",
            "--follower-port=0",
        ])
        .unwrap();
        let Command::Launch(any) = any.command else {
            panic!("not launch")
        };
        let ranks = any.ranks(0);
        assert_eq!(ranks[0].listen, "127.0.0.1:9000", "rank 0 keeps its port");
        assert_eq!(ranks[1].listen, "127.0.0.1:0");
        assert!(ranks.iter().all(|r| {
            r.env
                .contains(&("RANKWAY_METRICS_LISTEN".to_owned(), "127.0.0.1:0".to_owned()))
        }));
    }
}
