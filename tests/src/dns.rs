//! A DNS server for the leaders' name, as the headless Service's records would answer.

use hickory_proto::op::{Message, OpCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

/// The answer to `query`: every address in `records` as an A record (TTL 0).
fn dns_answer(query: &Message, records: &Mutex<Vec<Ipv4Addr>>) -> Message {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.authoritative = true;
    for q in &query.queries {
        resp.add_query(q.clone());
        for ip in records.lock().unwrap().iter() {
            resp.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A(*ip))));
        }
    }
    resp
}

/// A UDP socket and a TCP listener on one free loopback port. The kernel picks the UDP
/// port; the same TCP port may be taken (a connection of an earlier test uses it), and
/// then another port is tried.
async fn udp_and_tcp_on_one_port() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    for _ in 0..100 {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        match tokio::net::TcpListener::bind(sock.local_addr().unwrap()).await {
            Ok(tcp) => return (sock, tcp),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("bind TCP beside UDP: {e}"),
        }
    }
    panic!("no loopback port free for both UDP and TCP in 100 tries");
}

/// A minimal authoritative DNS server answering A queries from `records` (TTL 0), over
/// UDP and TCP on the same port. As real servers do, a UDP answer over 512 bytes is sent
/// truncated (TC set, no answers): the client must ask again over TCP.
pub async fn dns_server(records: Arc<Mutex<Vec<Ipv4Addr>>>) -> SocketAddr {
    let (sock, tcp) = udp_and_tcp_on_one_port().await;
    let addr = sock.local_addr().unwrap();
    let udp_records = records.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut bytes = dns_answer(&query, &udp_records).to_vec().unwrap();
            if bytes.len() > 512 {
                let mut cut = Message::response(query.metadata.id, OpCode::Query);
                cut.metadata.authoritative = true;
                cut.metadata.truncation = true;
                for q in &query.queries {
                    cut.add_query(q.clone());
                }
                bytes = cut.to_vec().unwrap();
            }
            let _ = sock.send_to(&bytes, peer).await;
        }
    });
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = tcp.accept().await {
            let records = records.clone();
            tokio::spawn(async move {
                // Each message is preceded by its length (2 bytes, big-endian).
                while let Ok(len) = conn.read_u16().await {
                    let mut buf = vec![0u8; len as usize];
                    if conn.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let Ok(query) = Message::from_vec(&buf) else {
                        return;
                    };
                    let bytes = dns_answer(&query, &records).to_vec().unwrap();
                    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&bytes);
                    if conn.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}
