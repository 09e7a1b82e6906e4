//! Token buckets for per-connection send and byte rates (SPEC 5), on the injected clock. The
//! rate and burst are the same for every connection (configuration), so a bucket stores only
//! its level and time: 16 bytes per connection. The shards keep two per connection and the
//! per-tenant send rate (`metrics::SendBucket`) one per tenant; this module depends on
//! nothing, so both can use it.

/// A token bucket's state; refilled at `rate` tokens per second up to `burst`.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    /// Tokens, in thousandths (so refill is exact at millisecond resolution).
    milli_tokens: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, now_ms: u64) -> Self {
        TokenBucket {
            milli_tokens: u64::from(burst) * 1000,
            last_ms: now_ms,
        }
    }

    /// Takes `n` tokens if there are enough; otherwise returns how long until there will be.
    pub fn take(&mut self, n: u32, rate: u32, burst: u32, now_ms: u64) -> Result<(), u64> {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let cap = u64::from(burst) * 1000;
        self.milli_tokens = cap.min(self.milli_tokens + elapsed * u64::from(rate));
        let need = u64::from(n) * 1000;
        if self.milli_tokens >= need {
            self.milli_tokens -= need;
            Ok(())
        } else if rate == 0 {
            Err(u64::MAX)
        } else {
            Err((need - self.milli_tokens).div_ceil(u64::from(rate)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let mut b = TokenBucket::new(3, 0);
        assert!(b.take(1, 10, 3, 0).is_ok());
        assert!(b.take(2, 10, 3, 0).is_ok());
        assert_eq!(b.take(1, 10, 3, 0), Err(100));
        assert!(b.take(1, 10, 3, 100).is_ok());
        // Refill never exceeds the burst.
        assert!(b.take(3, 10, 3, 10_000).is_ok());
        assert!(b.take(1, 10, 3, 10_000).is_err());
    }
}
