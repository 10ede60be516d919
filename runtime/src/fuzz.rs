//! The fuzz harness of Rankway's property tests (`fuzz_*` in every crate): a target is a
//! function that must not panic on any input its strategy makes. `make test` runs each
//! target for a few thousand cases; `make fuzz` for a million (`RANKWAY_FUZZ_CASES`).
//! A panic fails the target with the smallest input proptest finds that still panics.

use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestRunner};

/// Cases per target: `RANKWAY_FUZZ_CASES`, 2,000 by default.
pub fn cases() -> u32 {
    std::env::var("RANKWAY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

/// Runs `target` on [`cases`] inputs from `strategy`, and prints how many and how long.
pub fn run<S: Strategy>(name: &str, strategy: S, target: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let config = Config {
        cases: cases(),
        // Failures are reported, not written into the source tree.
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let started = Instant::now();
    let result = runner.run(&strategy, |value| {
        target(value);
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz target {name}: {e}");
    }
    eprintln!(
        "fuzz {name}: {} cases in {:.1} s, no panic",
        cases(),
        started.elapsed().as_secs_f64()
    );
}
