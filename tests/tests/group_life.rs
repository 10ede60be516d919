//! A group's life with real ranks over real Gloo: rank 0 is not ready until every rank
//! has joined; a lost rank breaks the group at once (NOT_SERVING, UNAVAILABLE for the
//! batches in flight, every rank exits non-zero); under `launch` the group comes back.

use std::time::{Duration, Instant};

use rankway_proto::worker::GroupStatusRequest;
use rankway_system_tests::{Gateway, Launcher, SERVING, Worker, alive, free_port, sigkill};
use serde_json::{Value, json};

const HEARTBEAT: Duration = Duration::from_millis(500);

fn group_env(rank: usize, world: usize, master_port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", master_port.to_string()),
        (
            "RANKWAY_HEARTBEAT_INTERVAL",
            format!("{}ms", HEARTBEAT.as_millis()),
        ),
    ]
}

/// Waits for a process to exit and returns whether it failed (non-zero or by signal).
async fn exits_non_zero(w: &mut Worker, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = w.proc.child.try_wait().unwrap() {
            return !status.success();
        }
        assert!(
            Instant::now() < deadline,
            "rank at {} still running after {within:?}:\n{}",
            w.addr,
            w.proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Time until rank 0 stops reporting SERVING (NOT_SERVING, or gone).
async fn time_to_not_serving(rank0: &Worker, since: Instant, limit: Duration) -> Duration {
    loop {
        if rank0.health().await != Some(SERVING) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "rank 0 still SERVING {limit:?} after the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank0_is_not_ready_until_every_rank_joins() {
    let port = free_port();
    let rank0 = Worker::start_rank(&group_env(0, 2, port), &["--model=mlp"]);
    let mut client = rank0.client().await;
    // Rank 1 is late: for several seconds rank 0 must say it is not ready, and why.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let s = client
            .group_status(GroupStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(!s.ready, "rank 0 ready without rank 1");
        assert!(
            s.reason.contains("waiting for every rank to join"),
            "reason: {}",
            s.reason
        );
        assert_ne!(rank0.health().await, Some(SERVING));
        // The metrics port's probes agree: live, not ready, and why.
        assert_eq!(rank0.probe("live").await, (200, "live\n".into()));
        let (status, body) = rank0.probe("ready").await;
        assert_eq!(status, 503);
        assert!(body.contains("waiting for every rank to join"), "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _rank1 = Worker::start_rank(&group_env(1, 2, port), &["--model=mlp"]);
    rank0.wait_serving(Duration::from_secs(60)).await;
    assert_eq!(rank0.probe("ready").await, (200, "ready\n".into()));
    let s = client
        .group_status(GroupStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(s.ready && s.reason.is_empty(), "{s:?}");
    assert_eq!(s.world_size, 2);
    assert_eq!(s.ranks.len(), 2);
    assert!(s.model.unwrap().shard_layout.starts_with("tp=2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_while_idle_breaks_the_group_within_two_heartbeats() {
    let port = free_port();
    let mut ranks: Vec<Worker> = (0..3)
        .map(|r| Worker::start_rank(&group_env(r, 3, port), &["--model=mlp", "--mlp-hidden=96"]))
        .collect();
    ranks[0].wait_serving(Duration::from_secs(60)).await;
    let killed = Instant::now();
    sigkill(ranks[2].proc.child.id());
    let took = time_to_not_serving(&ranks[0], killed, 10 * HEARTBEAT).await;
    eprintln!("idle: SIGKILL -> rank 0 not serving in {took:?} (heartbeat {HEARTBEAT:?})");
    assert!(took <= 2 * HEARTBEAT, "took {took:?}, more than two heartbeats");
    for (r, rank) in ranks.iter_mut().enumerate().take(2) {
        assert!(
            exits_non_zero(rank, Duration::from_secs(30)).await,
            "rank {r} must exit non-zero"
        );
    }
    assert!(
        ranks[0].proc.log_text().contains("Connection closed by peer"),
        "rank 0 says what broke"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_under_load_fails_in_flight_batches_with_unavailable() {
    let port = free_port();
    let mut ranks: Vec<Worker> = (0..3)
        .map(|r| Worker::start_rank(&group_env(r, 3, port), &[]))
        .collect();
    let gw = Gateway::start(&[&ranks[0]], &["--request-timeout=20s"]);
    gw.wait_ready().await;
    let http = reqwest::Client::new();

    // A stream of requests from 8 clients, each sending until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (http, url, stop) = (http.clone(), gw.url("/v1/embeddings"), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 200 {
                let text = format!("client {c} request {i} ").repeat(20);
                let started = Instant::now();
                let resp = http
                    .post(&url)
                    .json(&json!({"model": "minilm", "input": text}))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap();
                outcomes.push((status, body, started.elapsed()));
                i += 1;
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    sigkill(ranks[1].proc.child.id());
    let took = time_to_not_serving(&ranks[0], killed, 10 * HEARTBEAT).await;
    eprintln!("under load: SIGKILL -> rank 0 not serving in {took:?}");
    assert!(took <= 2 * HEARTBEAT, "took {took:?}, more than two heartbeats");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut ok = 0;
    let mut unavailable = 0;
    let mut lost_in_flight = 0;
    for c in clients {
        for (status, body, took) in c.await.unwrap() {
            assert!(
                took < Duration::from_secs(15),
                "a caller waited {took:?}: callers must never hang"
            );
            match status {
                200 => ok += 1,
                503 => {
                    unavailable += 1;
                    let msg = body["error"]["message"].as_str().unwrap_or_default().to_owned();
                    lost_in_flight += usize::from(msg.contains("did not complete"));
                    assert!(
                        msg.contains("did not complete")
                            || msg.contains("no ready worker group")
                            || msg.contains("has no ready")
                            || msg.contains("circuit breaker open"),
                        "503 says why: {msg}"
                    );
                }
                other => panic!("unexpected status {other}: {body}"),
            }
        }
    }
    eprintln!(
        "under load: {ok} succeeded, {unavailable} got 503 ({lost_in_flight} of them in flight when the rank died)"
    );
    assert!(ok > 0, "requests succeed before the kill");
    assert!(
        lost_in_flight > 0,
        "the batches in flight fail with UNAVAILABLE saying they did not complete"
    );
    for r in [0, 2] {
        assert!(
            exits_non_zero(&mut ranks[r], Duration::from_secs(30)).await,
            "rank {r} must exit non-zero"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_launch_a_broken_group_restarts_and_serves_again() {
    let mut launcher = Launcher::start(1, 2, &[]);
    let (_, first) = launcher.next_group_start();
    assert_eq!(first.len(), 2);
    let gw = Gateway::start_addrs(&launcher.leaders, &[]);
    gw.wait_ready().await;
    let http = reqwest::Client::new();
    let embed = || {
        http.post(gw.url("/v1/embeddings"))
            .json(&json!({"model": "minilm", "input": "back again"}))
    };
    assert_eq!(embed().send().await.unwrap().status(), 200);

    let killed = Instant::now();
    sigkill(first[1]);
    let (_, second) = launcher.next_group_start();
    assert!(
        second.iter().all(|p| !first.contains(p)),
        "the whole group is new: {first:?} -> {second:?}"
    );
    // The gateway sees the group go and come back.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = embed().send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "group not back within 90s: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("under launch: SIGKILL -> serving again in {:?}", killed.elapsed());
    assert!(launcher.proc.is_running());
}

/// A SIGKILLed launcher cannot stop its ranks; the kernel does (each asked for SIGTERM on
/// the launcher's death), so no orphaned group keeps its ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_launcher_leaves_no_rank_behind() {
    let mut launcher = Launcher::start(1, 2, &[]);
    let (_, ranks) = launcher.next_group_start();
    assert_eq!(ranks.len(), 2);
    assert!(ranks.iter().all(|&p| alive(p)), "ranks {ranks:?} up");
    sigkill(launcher.proc.child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(p) = ranks.iter().find(|&&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "rank pid {p} outlived its launcher by 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
