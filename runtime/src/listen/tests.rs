//! The listener on real loopback sockets: its cap, its timeouts, and its drain.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::*;

const HEADER_TIMEOUT: Duration = Duration::from_millis(200);
const IDLE_TIMEOUT: Duration = Duration::from_millis(400);

fn limits(max_connections: u32) -> ConnectionArgs {
    ConnectionArgs {
        max_connections,
        header_timeout: HEADER_TIMEOUT,
        keep_alive_timeout: Duration::from_secs(75),
        idle_timeout: IDLE_TIMEOUT,
        http2_max_streams: 8,
        http2_keepalive_interval: Duration::from_secs(30),
        http2_keepalive_timeout: Duration::from_secs(20),
    }
}

async fn listener(max_connections: u32) -> (Listener, SocketAddr, ConnectionMetrics) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let metrics = ConnectionMetrics::new(&Registry::new(), &[]);
    (
        Listener::new(tcp, "test", &limits(max_connections), &metrics),
        addr,
        metrics,
    )
}

/// Reads until the peer closes (or resets): how long that took.
async fn until_closed(mut client: TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server did not close the connection within 10 s"),
        }
    }
}

#[tokio::test]
async fn a_connection_over_the_cap_is_closed_at_once_and_counted() {
    let (listener, addr, metrics) = listener(1).await;
    let mut incoming = Box::pin(listener.into_incoming());
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(b"x").await.unwrap();
    let _held = incoming.next().await.unwrap().unwrap();
    let second = TcpStream::connect(addr).await.unwrap();
    let took = until_closed(second).await;
    assert!(took < HEADER_TIMEOUT, "closed after {took:?}, not at once");
    assert_eq!(metrics.refused.with_label_values(&["test"]).get(), 1);
    assert_eq!(metrics.open.with_label_values(&["test"]).get(), 1);
}

#[tokio::test]
async fn a_socket_that_sends_nothing_times_out_after_the_header_timeout() {
    let (listener, addr, metrics) = listener(8).await;
    let mut incoming = Box::pin(listener.into_incoming());
    let _client = TcpStream::connect(addr).await.unwrap();
    let mut conn = incoming.next().await.unwrap().unwrap();
    let started = Instant::now();
    let err = conn.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(
        started.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(metrics.timed_out.with_label_values(&["test"]).get(), 1);
    drop(conn);
    assert_eq!(
        metrics.open.with_label_values(&["test"]).get(),
        0,
        "a closed connection is not open"
    );
}

#[tokio::test]
async fn a_talking_socket_stays_open_and_a_silent_one_closes_after_the_idle_timeout() {
    let (listener, addr, metrics) = listener(8).await;
    let mut incoming = Box::pin(listener.into_incoming());
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"a").await.unwrap();
    let mut conn = incoming.next().await.unwrap().unwrap();
    let mut buf = [0u8; 8];
    // A byte every quarter of the idle timeout, for three idle timeouts: never idle.
    let talk = tokio::spawn(async move {
        for _ in 0..12 {
            tokio::time::sleep(IDLE_TIMEOUT / 4).await;
            client.write_all(b"b").await.unwrap();
        }
        client
    });
    let mut read = 0;
    while read < 13 {
        read += conn
            .read(&mut buf)
            .await
            .expect("a connection moving bytes is not idle");
    }
    let _client = talk.await.unwrap();
    let started = Instant::now();
    let err = conn.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(started.elapsed() >= IDLE_TIMEOUT / 2, "{:?}", started.elapsed());
    assert_eq!(metrics.timed_out.with_label_values(&["test"]).get(), 1);
}

/// One HTTP/1.1 request on `client`; the answer's head, lower-cased.
async fn get(client: &mut TcpStream) -> String {
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\nok") {
        assert_eq!(
            client.read(&mut byte).await.unwrap(),
            1,
            "closed mid-answer: {head:?}"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[tokio::test]
async fn shutting_down_answers_an_open_connection_with_connection_close() {
    let (listener, addr, _metrics) = listener(8).await;
    let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(listener.serve_http(router, async {
        let _ = stopped.await;
    }));
    let mut client = TcpStream::connect(addr).await.unwrap();
    let before = get(&mut client).await;
    assert!(before.starts_with("http/1.1 200"), "{before}");
    assert!(!before.contains("connection: close"), "{before}");
    stop.send(()).unwrap();
    // The listener closes at once; the open connection is still served, told to close.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a draining listener accepts no more"
    );
    let during = get(&mut client).await;
    assert!(during.contains("connection: close"), "{during}");
    tokio::time::timeout(CLOSE_NOTICE + Duration::from_secs(5), server)
        .await
        .expect("serve_http returns once its connections are gone")
        .unwrap();
}
