//! What the load generators share (included by each with `#[path]`).

/// The `q` quantile of microsecond samples sorted ascending, in ms (NaN when empty).
pub fn percentile_ms<T: Copy + Into<u64>>(sorted_us: &[T], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i].into() as f64 / 1e3
}

/// The one-thread runtime the load generators run on (they must not compete for the
/// cores the server under test needs).
pub fn runtime() -> tokio::runtime::Runtime {
    rankway_runtime::executor::build(1).expect("tokio runtime")
}
