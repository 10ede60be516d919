//! Processes of the system under test: the binaries' paths, a child process that is
//! killed when dropped with its log lines read back, ports, signals.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

pub const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The worker binary: `RANKWAY_WORKER_BIN`, else the release build in `target/`.
pub fn worker_bin() -> PathBuf {
    release_bin("RANKWAY_WORKER_BIN", "rankway-worker")
}

/// The gateway binary: `RANKWAY_GATEWAY_BIN`, else the release build in `target/`.
pub fn gateway_bin() -> PathBuf {
    release_bin("RANKWAY_GATEWAY_BIN", "rankway-gateway")
}

fn release_bin(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release").join(name));
    assert!(
        path.exists(),
        "{} is missing: run `make test` (or `cargo build --release --bins`) first",
        path.display()
    );
    path
}

/// A child process that is killed when dropped, with its log lines on a channel.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Self {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        cmd.env("RANKWAY_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn process");
        let stderr: ChildStderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Self { child, lines, log }
    }

    /// Waits for the JSON log line whose message is `message`; returns its fields.
    pub fn wait_for_log(&mut self, message: &str) -> serde_json::Map<String, Value> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => panic!(
                    "no {message:?} log line within {START_TIMEOUT:?}; exit: {:?}; log:\n{}",
                    self.child.try_wait(),
                    self.log.lock().unwrap().join("\n")
                ),
            };
            let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(Value::Object(fields)) = obj.get("fields")
                && fields.get("message").and_then(Value::as_str) == Some(message)
            {
                return fields.clone();
            }
        }
    }

    pub fn addr_field(fields: &serde_json::Map<String, Value>, key: &str) -> SocketAddr {
        fields
            .get(key)
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("log field {key} is not an address: {fields:?}"))
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The log once `done` holds for it. Another thread reads the lines, so one the
    /// process has already written may not be here yet; panics after 10 s, naming `what`.
    pub async fn log_when(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log_text();
            if done(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} in the log within 10 s:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    /// SIGTERM first, so a launcher stops its ranks and a worker drains; SIGKILL if the
    /// process is still there after a few seconds. When a test is failing, the end of
    /// the process's log goes to the test output first.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A panic may have poisoned the lock (a failed wait_for_log holds it while it
            // formats its message); panicking again here would abort every other test.
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            let tail = &log[log.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} log lines of pid {} ---\n{}",
                tail.len(),
                self.child.id(),
                tail.join("\n")
            );
        }
        if self.is_running() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (for the c10d store, which the worker binds itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The first of `n` consecutive ports that were free a moment ago, for `launch`'s
/// `--port` and `--master-port` (group g uses base + g). Below Linux's ephemeral range
/// (32768-60999), so no client socket can be holding base + 1 the way it can hold the
/// neighbour of a port from `free_port`.
pub fn free_port_run(n: u16) -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..100 {
        let base = rng.random_range(20000..32000 - n);
        if (base..base + n).all(|p| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports in 20000-32000");
}

/// Whether a process is running (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// SIGKILLs a process by pid.
pub fn sigkill(pid: u32) {
    signal(pid, "KILL");
}

/// Sends a process the signal `name` (`TERM`, `KILL`, ...) by pid.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// `promtool check metrics` on `text`; the lint's complaints if it fails.
pub fn promtool(what: &str, text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed for {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
