//! Guest instruction rate measurement: a loop with a known instruction count
//! runs for a number of PIT ticks; the rate follows from the count.

use crate::TICKS_PER_SECOND;

/// Iterations of the inner `dec rcx; jnz` loop per outer iteration.
pub const INNER_ITERATIONS: u64 = 1000;
/// Instructions of one outer iteration: `mov ecx, N`, N x (`dec`, `jnz`),
/// then `inc`, `cmp`, `jb`.
pub const INSTRUCTIONS_PER_OUTER: u64 = 2 * INNER_ITERATIONS + 4;
/// Ticks the measurement runs for (half a second).
pub const MEASURE_TICKS: u64 = 50;

/// Instructions per second from `outer` outer iterations over `ticks` ticks.
pub fn instructions_per_second(outer: u64, ticks: u64) -> u64 {
    if ticks == 0 {
        return 0;
    }
    outer
        .saturating_mul(INSTRUCTIONS_PER_OUTER)
        .saturating_mul(TICKS_PER_SECOND)
        / ticks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate() {
        // 425 outer iterations in 50 ticks: 851,700 instructions in 0.5 s.
        assert_eq!(instructions_per_second(425, 50), 1_703_400);
        assert_eq!(instructions_per_second(0, 50), 0);
        assert_eq!(instructions_per_second(10, 0), 0);
        assert_eq!(instructions_per_second(u64::MAX, 1), u64::MAX);
        assert_eq!(instructions_per_second(u64::MAX, 100), u64::MAX / 100);
    }
}
