//! Latency samples and their summary (percentiles by nearest rank).

use std::time::Duration;

/// Summary of a set of latency samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Summary {
    /// Summarises samples given in nanoseconds (the slice is sorted in place).
    pub fn from_nanos(samples: &mut [u64]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let pick = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            Duration::from_nanos(samples[rank - 1])
        };
        Summary {
            count: samples.len(),
            p50: pick(0.50),
            p99: pick(0.99),
            max: Duration::from_nanos(samples[samples.len() - 1]),
        }
    }
}

/// Formats a duration in milliseconds with three decimals, or `-` when there were no samples.
pub fn ms(d: Duration, count: usize) -> String {
    if count == 0 {
        "-".to_string()
    } else {
        format!("{:.3} ms", d.as_secs_f64() * 1000.0)
    }
}

/// Formats `a / b` as `1.23x`, or `-` when it is undefined.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "-".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).collect();
        let s = Summary::from_nanos(&mut v);
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, Duration::from_nanos(50));
        assert_eq!(s.p99, Duration::from_nanos(99));
        assert_eq!(s.max, Duration::from_nanos(100));
        assert_eq!(Summary::from_nanos(&mut []).count, 0);
    }
}
