//! DNS discovery with a DNS server on loopback: the gateway resolves a leaders name
//! (`--leaders-dns`, `--dns-server`); adding an address adds a group live, removing it
//! takes the group out. The groups are real workers on 127.0.0.1 and 127.0.0.2 (both
//! loopback on Linux), so one port serves both addresses. A name with more groups than a
//! UDP answer holds is read whole over TCP.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rankway_system_tests::{Gateway, Worker, admin_groups, dns_server, free_port};
use serde_json::{Value, json};

async fn wait_for(
    http: &reqwest::Client,
    gw: &Gateway,
    what: &str,
    ok: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let g = admin_groups(http, &gw.url("")).await;
        if ok(&g) {
            return g;
        }
        assert!(Instant::now() < deadline, "{what}: groups are {g:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_follow_the_leaders_dns_name() {
    let port = free_port();
    let w1 = Worker::start(&[&format!("--listen=127.0.0.1:{port}")]);
    let w2 = Worker::start(&[&format!("--listen=127.0.0.2:{port}")]);
    w1.wait_serving(Duration::from_secs(60)).await;
    w2.wait_serving(Duration::from_secs(60)).await;
    let records = Arc::new(Mutex::new(vec![Ipv4Addr::new(127, 0, 0, 1)]));
    let dns = dns_server(records.clone()).await;
    let gw = Gateway::start_addrs(
        &[],
        &[
            &format!("--leaders-dns=leaders.rankway.test:{port}"),
            &format!("--dns-server={dns}"),
            "--dns-interval=200ms",
        ],
    );
    gw.wait_ready().await;
    let http = reqwest::Client::new();
    let one = admin_groups(&http, &gw.url("")).await;
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0]["address"], format!("127.0.0.1:{port}"));

    // A new address is a new group, live.
    records.lock().unwrap().push(Ipv4Addr::new(127, 0, 0, 2));
    let two = wait_for(&http, &gw, "second group added", |g| {
        g.len() == 2 && g.iter().all(|x| x["ready"] == true)
    })
    .await;
    assert!(two.iter().any(|g| g["address"] == format!("127.0.0.2:{port}")));
    let r = http
        .post(gw.url("/v1/embeddings"))
        .json(&json!({"model": "minilm", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A removed address leaves the pool; traffic goes on through the remaining group.
    records
        .lock()
        .unwrap()
        .retain(|ip| *ip != Ipv4Addr::new(127, 0, 0, 1));
    let left = wait_for(&http, &gw, "first group removed", |g| g.len() == 1).await;
    assert_eq!(left[0]["address"], format!("127.0.0.2:{port}"));
    let before = w2.batches_completed().await;
    let removed_before = w1.batches_completed().await;
    for _ in 0..3 {
        let r = http
            .post(gw.url("/v1/embeddings"))
            .json(&json!({"model": "minilm", "input": "still"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(
        w2.batches_completed().await >= before + 3,
        "the remaining group serves"
    );
    assert_eq!(
        w1.batches_completed().await,
        removed_before,
        "the removed group gets no more batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_more_groups_than_a_udp_answer_holds_is_read_whole() {
    // 100 A records make a 1.6 KB answer: the UDP one comes back truncated.
    let many: Vec<Ipv4Addr> = (1..=100).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect();
    let dns = dns_server(Arc::new(Mutex::new(many))).await;
    let gw = Gateway::start_addrs(
        &[],
        &[
            "--leaders-dns=leaders.test:9",
            &format!("--dns-server={dns}"),
            "--dns-interval=200ms",
        ],
    );
    let http = reqwest::Client::new();
    let groups = wait_for(&http, &gw, "all 100 groups", |g| g.len() == 100).await;
    assert!(
        groups.iter().any(|g| g["address"] == "127.0.1.100:9"),
        "{groups:?}"
    );
}
